"""Conditions in metav1.Condition form; lastTransitionTime moves only when status flips."""

from __future__ import annotations

from spotrun.lifecycle.conditions import find, is_true, set_condition
from spotrun.lifecycle.times import format_time


def test_a_new_condition_gets_the_transition_time_and_generation() -> None:
    out = set_condition([], "Running", True, "AllReplicasRunning", "2/2", now=10.0, generation=4)
    assert out == [
        {
            "type": "Running",
            "status": "True",
            "reason": "AllReplicasRunning",
            "message": "2/2",
            "lastTransitionTime": format_time(10.0),
            "observedGeneration": 4,
        }
    ]


def test_transition_time_kept_when_only_the_reason_changes() -> None:
    first = set_condition([], "Running", False, "Starting", "0/2", now=10.0)
    second = set_condition(
        first, "Running", False, "OOMKilled", "replica 1", now=99.0, generation=2
    )
    (condition,) = second
    assert condition["lastTransitionTime"] == format_time(10.0)
    assert (condition["reason"], condition["message"]) == ("OOMKilled", "replica 1")
    assert condition["observedGeneration"] == 2


def test_transition_time_moves_when_the_status_flips() -> None:
    first = set_condition([], "Running", False, "Starting", "", now=10.0)
    second = set_condition(first, "Running", True, "AllReplicasRunning", "", now=20.0)
    assert second[0]["lastTransitionTime"] == format_time(20.0)


def test_other_conditions_are_kept_in_place() -> None:
    corrupt = {"type": "CheckpointCorrupt", "status": "True", "reason": "Sha256Mismatch"}
    first = set_condition([corrupt], "Running", True, "AllReplicasRunning", "", now=1.0)
    second = set_condition(first, "PodsReady", True, "AllReplicasReady", "", now=1.0)
    assert [c["type"] for c in second] == ["CheckpointCorrupt", "Running", "PodsReady"]
    assert second[0] == corrupt
    assert is_true(second, "CheckpointCorrupt")
    assert not is_true(second, "Suspended")
    assert find(second, "Suspended") is None


def test_reasons_the_api_server_would_reject_are_cleaned() -> None:
    for raw, clean in [
        ("DisruptionTarget: PreemptionByScheduler", "DisruptionTarget:PreemptionByScheduler"),
        ("node-lost", "nodelost"),
        ("42", "Unknown"),
        ("", "Unknown"),
    ]:
        (condition,) = set_condition([], "Running", False, raw, "", now=0.0)
        assert condition["reason"] == clean


def test_input_is_not_modified() -> None:
    first = set_condition([], "Running", False, "Starting", "", now=10.0)
    set_condition(first, "Running", True, "AllReplicasRunning", "", now=20.0)
    assert first[0]["status"] == "False"
