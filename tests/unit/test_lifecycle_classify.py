"""The classifier: preemption vs application failure vs hang vs nothing, and blockers."""

from __future__ import annotations

from typing import Any

import pytest

from spotrun.contract import EXIT_PREEMPTED as CONTRACT_EXIT_PREEMPTED
from spotrun.lifecycle.classify import EXIT_PREEMPTED, blocker, classify, preemption_of
from spotrun.lifecycle.hang import ProgressWatch
from spotrun.lifecycle.observation import ReplicaObservation


def replica(index: int, **fields: Any) -> ReplicaObservation:
    fields.setdefault("phase", "running")
    return ReplicaObservation(index, attempt=1, **fields)


def running(index: int) -> ReplicaObservation:
    return replica(index, ready=True)


def test_exit_code_of_a_preemption_notice_matches_the_pod_contract() -> None:
    assert EXIT_PREEMPTED == CONTRACT_EXIT_PREEMPTED


# (name, replicas, was_running, expected kind, expected reason, expected replicas)
CASES: list[tuple[str, list[ReplicaObservation], bool, str | None, str | None, tuple[int, ...]]] = [
    ("all running is fine", [running(0), running(1)], True, None, None, ()),
    ("pending before start is fine", [replica(0, phase="pending")], False, None, None, ()),
    ("missing before start is fine", [replica(0, phase="missing")], False, None, None, ()),
    (
        "disruption target is a preemption",
        [running(0), replica(1, preempted=True, preemption_reason="TerminationByKubelet")],
        True,
        "preemption",
        "TerminationByKubelet",
        (1,),
    ),
    (
        "node shutdown is a preemption",
        [replica(0, phase="failed", preempted=True, preemption_reason="NodeShutdown")],
        True,
        "preemption",
        "NodeShutdown",
        (0,),
    ),
    (
        "preempted without a named reason",
        [replica(0, preempted=True)],
        True,
        "preemption",
        "Preempted",
        (0,),
    ),
    (
        "a preemption notice honoured is a preemption",
        [replica(0, restarts=1, exit_code=EXIT_PREEMPTED), running(1)],
        True,
        "preemption",
        "PreemptionNotice",
        (0,),
    ),
    (
        "the observer's reason wins over the consequent notice exits",
        [
            replica(0, restarts=1, exit_code=EXIT_PREEMPTED),
            replica(1, preempted=True, preemption_reason="NodeLost"),
        ],
        True,
        "preemption",
        "NodeLost",
        (0, 1),
    ),
    (
        "a replica pending again after running was replaced",
        [running(0), replica(1, phase="pending")],
        True,
        "preemption",
        "Vanished",
        (1,),
    ),
    (
        "a replica missing after running vanished",
        [running(0), replica(1, phase="missing")],
        True,
        "preemption",
        "Vanished",
        (1,),
    ),
    (
        "a preemption and the failures it caused are one preemption",
        [
            replica(0, phase="failed", exit_code=1, reason="Error"),
            replica(1, preempted=True, preemption_reason="DeletionByTaintManager"),
            replica(2, restarts=2, exit_code=1, waiting_reason="CrashLoopBackOff"),
        ],
        True,
        "preemption",
        "DeletionByTaintManager",
        (1,),
    ),
    (
        "oom kill is named",
        [running(0), replica(1, restarts=1, exit_code=137, reason="OOMKilled")],
        True,
        "failure",
        "OOMKilled",
        (1,),
    ),
    (
        "non-zero exit of a failed replica",
        [replica(0, phase="failed", exit_code=2, reason="Error")],
        True,
        "failure",
        "Error",
        (0,),
    ),
    (
        "failed replica with no exit code",
        [replica(0, phase="failed")],
        False,
        "failure",
        "Error",
        (0,),
    ),
    (
        "restart count rising is a failure",
        [replica(0, restarts=1, exit_code=1)],
        True,
        "failure",
        "Error",
        (0,),
    ),
    (
        "a restart after a clean exit is not a failure",
        [replica(0, restarts=1, exit_code=0, reason="Completed")],
        True,
        None,
        None,
        (),
    ),
    (
        "crash loop without a recorded exit",
        [replica(0, phase="pending", waiting_reason="CrashLoopBackOff")],
        False,
        "failure",
        "CrashLoopBackOff",
        (0,),
    ),
    (
        "crash loop names the crash",
        [
            replica(
                0, waiting_reason="CrashLoopBackOff", restarts=3, exit_code=137, reason="OOMKilled"
            )
        ],
        True,
        "failure",
        "OOMKilled",
        (0,),
    ),
    (
        "several failures are one interruption",
        [replica(0, phase="failed", exit_code=1), replica(1, phase="failed", exit_code=1)],
        True,
        "failure",
        "Error",
        (0, 1),
    ),
    (
        "unschedulable is not an interruption",
        [replica(0, phase="pending", waiting_reason="Unschedulable")],
        False,
        None,
        None,
        (),
    ),
    (
        "image pull errors are not an interruption",
        [replica(0, phase="pending", waiting_reason="ImagePullBackOff")],
        False,
        None,
        None,
        (),
    ),
]


@pytest.mark.parametrize(
    ("replicas", "was_running", "kind", "reason", "where"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_classify(
    replicas: list[ReplicaObservation],
    was_running: bool,
    kind: str | None,
    reason: str | None,
    where: tuple[int, ...],
) -> None:
    verdict = classify(replicas, expected=len(replicas), was_running=was_running, now=100.0)
    if kind is None:
        assert verdict is None
    else:
        assert verdict is not None
        assert (verdict.kind, verdict.reason, verdict.replicas) == (kind, reason, where)


def test_a_replica_absent_after_running_vanished() -> None:
    verdict = classify([running(0)], expected=2, was_running=True, now=0.0)
    assert verdict is not None
    assert (verdict.kind, verdict.reason, verdict.replicas) == ("preemption", "Vanished", (1,))


def test_a_missing_replica_with_a_reason_is_not_also_vanished() -> None:
    gone = ReplicaObservation(
        1, 1, phase="missing", preempted=True, preemption_reason="TerminationByKubelet"
    )
    verdict = classify([running(0), gone], expected=2, was_running=True, now=0.0)
    assert verdict is not None
    assert (verdict.reason, verdict.replicas) == ("TerminationByKubelet", (1,))
    assert verdict.message == "lost replica 1 (TerminationByKubelet)"


def test_a_replica_absent_before_running_is_only_not_started() -> None:
    assert classify([running(0)], expected=2, was_running=False, now=0.0) is None


def test_failure_message_says_which_replica_and_how() -> None:
    verdict = classify(
        [replica(3, restarts=1, exit_code=137, reason="OOMKilled")],
        expected=1,
        was_running=False,
        now=0.0,
    )
    assert verdict is not None
    assert verdict.message == "replica 3 exited with code 137 (OOMKilled) after 1 container restart"


def watch(since: float, seconds: float = 60.0) -> ProgressWatch:
    return ProgressWatch(
        since, seconds, False, f"failurePolicy.progressDeadlineSeconds={seconds:g}"
    )


@pytest.mark.parametrize(
    ("since", "now", "hung"),
    [(0.0, 60.0, False), (0.0, 60.5, True), (100.0, 130.0, False)],
    ids=["at the deadline", "past the deadline", "recent progress"],
)
def test_hang_when_no_progress_within_the_deadline(since: float, now: float, hung: bool) -> None:
    verdict = classify([running(0)], expected=1, was_running=True, now=now, watch=watch(since))
    if hung:
        assert verdict is not None
        assert (verdict.kind, verdict.reason) == ("hang", "ProgressDeadlineExceeded")
        assert "progressDeadlineSeconds=60" in verdict.message
    else:
        assert verdict is None


def test_no_hang_without_a_watch() -> None:
    assert classify([running(0)], expected=1, was_running=True, now=1e9) is None


def test_a_start_up_past_its_allowance_is_a_hang_of_its_own_name() -> None:
    starting = ProgressWatch(0.0, 600.0, True, "failurePolicy.startupDeadlineSeconds=600")
    verdict = classify([running(0)], expected=1, was_running=True, now=601.0, watch=starting)
    assert verdict is not None
    assert (verdict.kind, verdict.reason) == ("hang", "StartupDeadlineExceeded")
    assert "after every replica started" in verdict.message
    assert "startupDeadlineSeconds=600" in verdict.message


def test_failure_wins_over_hang() -> None:
    verdict = classify(
        [replica(0, phase="failed", exit_code=1)],
        expected=1,
        was_running=True,
        now=1000.0,
        watch=watch(0.0, 10.0),
    )
    assert verdict is not None and verdict.kind == "failure"


def test_preemption_of_ignores_replicas_that_only_went_pending() -> None:
    assert preemption_of([replica(0, phase="pending"), replica(1, phase="missing")]) is None
    late = preemption_of([replica(0, phase="failed", exit_code=1), replica(1, preempted=True)])
    assert late is not None and late.replicas == (1,)


BLOCKERS: list[tuple[str, list[ReplicaObservation], str | None]] = [
    ("none", [replica(0, phase="pending")], None),
    (
        "unschedulable",
        [replica(0, phase="pending", waiting_reason="Unschedulable")],
        "Unschedulable",
    ),
    (
        "image pull back-off",
        [replica(0, phase="pending", waiting_reason="ImagePullBackOff")],
        "ImagePullBackOff",
    ),
    (
        "err image pull",
        [replica(0, phase="pending", waiting_reason="ErrImagePull")],
        "ImagePullBackOff",
    ),
    (
        "invalid image name",
        [replica(0, phase="pending", waiting_reason="InvalidImageName")],
        "ImagePullBackOff",
    ),
    (
        "missing secret",
        [replica(0, phase="pending", waiting_reason="CreateContainerConfigError")],
        "CreateContainerConfigError",
    ),
    (
        "image errors come before unschedulable",
        [
            replica(0, phase="pending", waiting_reason="Unschedulable"),
            replica(1, phase="pending", waiting_reason="ErrImagePull"),
        ],
        "ImagePullBackOff",
    ),
    (
        "a replica being deleted blocks nothing",
        [replica(0, phase="pending", waiting_reason="Unschedulable", deleting=True)],
        None,
    ),
]


@pytest.mark.parametrize(
    ("replicas", "reason"), [b[1:] for b in BLOCKERS], ids=[b[0] for b in BLOCKERS]
)
def test_blocker(replicas: list[ReplicaObservation], reason: str | None) -> None:
    found = blocker(replicas)
    assert (found.reason if found else None) == reason


def test_blocker_message_carries_the_kubelet_message() -> None:
    found = blocker(
        [replica(1, phase="pending", waiting_reason="ErrImagePull", message='pull "x:y" failed')]
    )
    assert found is not None
    assert found.message == 'replica 1: ErrImagePull: pull "x:y" failed'
