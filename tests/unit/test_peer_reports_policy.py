"""Members their peers report silent (status.peerReports): lost without notice, though their
pods still run, and the policy restarts warm without them at once."""

from __future__ import annotations

from typing import Any

import pytest

from spotrun.lifecycle import JobSpec, Observation, RestartGroup
from spotrun.lifecycle.group import GroupRecord
from spotrun.lifecycle.peers import PEER_UNRESPONSIVE, reported, unresponsive
from tests.unit.test_elastic_policy import lost, running
from tests.unit.test_spares_policy import T0, started, step

pytestmark = pytest.mark.unit

SPEC = JobSpec(replicas=3)


def report(status: dict[str, Any], by: int, *nodes: int, attempt: int | None = None) -> None:
    entry = {"attempt": status["attempt"] if attempt is None else attempt, "nodes": list(nodes)}
    status.setdefault("peerReports", {})[str(by)] = {**entry, "time": "2023-11-14T22:14:00Z"}


def test_a_member_its_peers_report_silent_is_lost_and_the_others_are_kept_warm() -> None:
    status = started(SPEC)
    report(status, 0, 2)
    report(status, 1, 2)
    decision = step(SPEC, status, 30, *(running(i, 1) for i in range(3)))
    restart = [a for a in decision.actions if isinstance(a, RestartGroup)]
    assert restart and restart[0].attempt == 2 and restart[0].keep == (0, 1)
    entry = decision.status["interruptions"][-1]
    assert (entry["kind"], entry["reason"], entry["recovery"]) == (
        "preemption",
        PEER_UNRESPONSIVE,
        "warm",
    )
    assert decision.status["preemptions"] == 1 and decision.status["failures"] == 0
    # It restarts at once: the silent member writes no final checkpoint worth waiting for.
    assert "restartNotBefore" not in decision.status


def test_reports_of_another_attempt_or_from_a_replica_outside_the_group_count_for_nothing() -> None:
    status = started(SPEC)
    report(status, 0, 2, attempt=0)  # an older group's
    report(status, 7, 2)  # not a member
    report(status, 1, 1)  # about itself
    decision = step(SPEC, status, 30, *(running(i, 1) for i in range(3)))
    assert decision.status["state"] == "Running" and decision.status["attempt"] == 1
    assert not [a for a in decision.actions if isinstance(a, RestartGroup)]


def test_a_reporter_that_is_gone_itself_is_not_believed() -> None:
    status = started(SPEC)
    report(status, 2, 0)
    replicas = (running(0, 1), running(1, 1), lost(2, 1))
    assert unresponsive(status, Observation(T0, replicas), 3) == set()


def test_two_members_that_report_each_other_keep_the_lower_index() -> None:
    """A partition between them: one side must go, and always the same one."""
    status = started(JobSpec(replicas=2))
    report(status, 1, 0)
    report(status, 0, 1)
    replicas = (running(0, 1), running(1, 1))
    assert unresponsive(status, Observation(T0, replicas), 2) == {1}
    decision = step(JobSpec(replicas=2), status, 30, *replicas)
    restart = [a for a in decision.actions if isinstance(a, RestartGroup)]
    assert restart and restart[0].keep == (0,)


def test_node_ranks_map_to_the_group_s_members() -> None:
    """An elastic group or a promoted spare: node rank 1 of attempt 2 is pod 3."""
    status = {
        "attempt": 2,
        "group": GroupRecord(2, "warm", 3, (0, 2, 3), members=(0, 3, 2)).to_status(),
        "peerReports": {
            "0": {"attempt": 2, "nodes": [1]},
            "2": {"attempt": 2, "nodes": [1, 9, -1, "x"]},
        },
    }
    assert reported(status, 3) == {0: (3,), 2: (3,)}


@pytest.mark.parametrize(
    "raw",
    [None, [], "x", {"a": {"attempt": 1, "nodes": [0]}}, {"1": "x"}, {"1": {"attempt": 1}}],
)
def test_malformed_reports_are_ignored(raw: Any) -> None:
    assert reported({"attempt": 1, "peerReports": raw}, 3) == {}


def test_a_member_already_lost_otherwise_keeps_its_own_reason() -> None:
    """A notice came first (its pod carries a DisruptionTarget): a report does not hide it,
    and the restart still waits for the final checkpoint it is writing."""
    status = started(SPEC)
    report(status, 0, 2)
    noticed = running(2, 1).__class__(
        2, 1, phase="running", ready=True, preempted=True, preemption_reason="DisruptionTarget"
    )
    decision = step(SPEC, status, 30, running(0, 1), running(1, 1), noticed)
    entry = decision.status["interruptions"][-1]
    assert entry["reason"] == "DisruptionTarget"
    assert "restartNotBefore" in decision.status  # waiting for the final checkpoint


def test_with_a_spare_the_silent_member_s_place_goes_to_the_spare() -> None:
    spec = JobSpec(replicas=2, spares=1)
    status = started(spec)
    report(status, 0, 1)
    decision = step(spec, status, 30, *(running(i, 1) for i in range(3)))
    record = GroupRecord.from_status(decision.status)
    assert record is not None and record.attempt == 2 and record.indices == (0, 2)
    restart = [a for a in decision.actions if isinstance(a, RestartGroup)]
    assert restart and 1 not in restart[0].keep
