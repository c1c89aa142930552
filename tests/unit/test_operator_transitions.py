"""transitions and wakeups: one status write per change, events only on transitions, wake-ups.

These pin the operator's write discipline through the real policy: a second pass over the
same observation writes nothing; a preemption produces one write and one event; a restart
is counted once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from spotrun.lifecycle import JobSpec, Observation, ReplicaObservation, plan
from spotrun.lifecycle.spec import Backoff, Elastic, FailurePolicy
from spotrun_operator import transitions
from spotrun_operator.handlers.reconcile import freshest
from spotrun_operator.wakeups import Wakeups

T0 = 1_700_000_000.0
SPEC = JobSpec(replicas=2, failure_policy=FailurePolicy(backoff=Backoff(1.0, 2.0, 0.0)))


def running(attempt: int, *indexes: int) -> tuple[ReplicaObservation, ...]:
    return tuple(ReplicaObservation(i, attempt, phase="running", ready=True) for i in indexes)


def step(status: dict[str, Any], now: float, *replicas: ReplicaObservation) -> dict[str, Any]:
    return plan(SPEC, status, Observation(now=now, replicas=replicas), jitter=0.0).status


def test_a_pass_that_changes_nothing_writes_nothing() -> None:
    status = step({}, T0)
    status = step(status, T0 + 1, *running(1, 0, 1))
    again = step(status, T0 + 50, *running(1, 0, 1))
    assert transitions.status_patch(status, again) is None
    assert transitions.events(status, again) == []


def test_a_preemption_and_the_restart_produce_one_write_each_and_their_events() -> None:
    status = step(step({}, T0), T0 + 1, *running(1, 0, 1))
    lost = ReplicaObservation(0, 1, phase="running", preempted=True, preemption_reason="PodDeleted")
    interrupted = step(status, T0 + 2, lost, *running(1, 1))
    patch = transitions.status_patch(status, interrupted)
    assert patch is not None
    assert patch["state"] == "Restarting" and patch["preemptions"] == 1
    assert [e.reason for e in transitions.events(status, interrupted)] == ["AttemptPreempted"]
    assert transitions.restart_reason(status, interrupted) is None

    restarted = step(interrupted, T0 + 10, *running(1, 1))
    assert restarted["attempt"] == 2
    assert transitions.restart_reason(interrupted, restarted) == "PodDeleted"
    assert [e.reason for e in transitions.events(interrupted, restarted)] == ["GroupRestarted"]
    # restartNotBefore is dropped with null, so a merge patch removes it.
    assert transitions.status_patch(interrupted, restarted)["restartNotBefore"] is None  # type: ignore[index]


def test_runtime_fields_are_never_in_the_operators_patch() -> None:
    old = {"state": "Running", "latestCheckpoint": {"step": 5}, "lastMetrics": {"step": 6}}
    new = {"state": "Running", "latestCheckpoint": {"step": 1}}
    assert transitions.status_patch(old, new) is None


def test_failed_state_emits_a_warning_with_the_budget_message() -> None:
    old = {"state": "Restarting", "attempt": 2}
    new = {
        "state": "Failed",
        "attempt": 2,
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": "MaxFailuresExceeded",
                "message": "4 failures",
            }
        ],
    }
    [event] = transitions.events(old, new)
    assert (event.type, event.reason, event.message) == (
        "Warning",
        "MaxFailuresExceeded",
        "4 failures",
    )


def test_the_freshest_copy_of_the_job_wins() -> None:
    live = {"metadata": {"resourceVersion": "10"}, "status": {"attempt": 1}}
    written = {"metadata": {"resourceVersion": "12"}, "status": {"attempt": 2}}
    assert freshest(live, written)["status"]["attempt"] == 2
    assert (
        freshest({**live, "metadata": {"resourceVersion": "13"}}, written)["status"]["attempt"] == 1
    )
    assert freshest(live, None)["status"]["attempt"] == 1


def test_a_poke_wakes_only_its_own_job_and_is_not_lost_while_busy() -> None:
    async def scenario() -> tuple[int, int, bool]:
        wakeups = Wakeups()
        a, b = ("ns", "a"), ("ns", "b")
        seen_a, seen_b = wakeups.version(a), wakeups.version(b)
        waiter_b = asyncio.ensure_future(wakeups.wait(b, seen_b, timeout=5))
        await wakeups.poke(a)  # while a's loop is "busy": not waiting
        woke_a = await asyncio.wait_for(wakeups.wait(a, seen_a, timeout=5), 1)
        await asyncio.sleep(0.05)
        b_still_waiting = not waiter_b.done()
        await wakeups.poke(b)
        woke_b = await asyncio.wait_for(waiter_b, 1)
        return woke_a, woke_b, b_still_waiting

    woke_a, woke_b, b_still_waiting = asyncio.run(scenario())
    assert (woke_a, woke_b, b_still_waiting) == (1, 1, True)


def test_wait_returns_after_the_timeout_without_a_poke() -> None:
    async def scenario() -> int:
        wakeups = Wakeups()
        return await wakeups.wait(("ns", "a"), wakeups.version(("ns", "a")), timeout=0.05)

    assert asyncio.run(scenario()) == 0


def _corrupt(message: str, when: str = "2026-12-03T10:00:00Z") -> dict[str, object]:
    return {
        "conditions": [
            {
                "type": "CheckpointCorrupt",
                "status": "True",
                "reason": "FellBack",
                "message": message,
                "lastTransitionTime": when,
            },
            {"type": "Running", "status": "True", "reason": "AllReplicasRunning", "message": ""},
        ]
    }


def test_a_fallback_the_runtime_recorded_is_announced_once() -> None:
    from spotrun_operator.transitions import runtime_condition_marks, runtime_events

    status = _corrupt("ckpt-000005 failed verification; resumed from ckpt-000004")
    first = runtime_events({}, status)
    assert [(e.type, e.reason) for e in first] == [("Warning", "CheckpointFellBack")]
    assert "ckpt-000005" in first[0].message
    seen = runtime_condition_marks(status)
    assert runtime_events(seen, status) == []
    # The same condition reworded by a later fallback is news again.
    again = _corrupt("ckpt-000009 failed verification; resumed from ckpt-000008")
    assert [e.message for e in runtime_events(seen, again)] == [
        "ckpt-000009 failed verification; resumed from ckpt-000008"
    ]


def test_an_elastic_shrink_and_grow_are_announced_as_such() -> None:
    spec = JobSpec(replicas=2, elastic=Elastic(min_replicas=1, wait_seconds=5))

    def go(status: dict[str, Any], now: float, *replicas: ReplicaObservation) -> dict[str, Any]:
        return plan(spec, status, Observation(now=now, replicas=replicas), jitter=0.0).status

    status = go(go({}, T0), T0 + 1, *running(1, 0, 1))
    lost = ReplicaObservation(1, 1, phase="failed", preempted=True, preemption_reason="NodeLost")
    restarted = go(status, T0 + 2, *running(1, 0), lost)
    pending = ReplicaObservation(1, 2, phase="pending", waiting_reason="Unschedulable")
    shrunk = go(restarted, T0 + 8, *running(2, 0), pending)
    events = transitions.events(restarted, shrunk)
    assert [(e.type, e.reason) for e in events] == [
        ("Warning", "GroupShrunk"),
        ("Normal", "GroupRestarted"),
    ]
    assert events[0].message.startswith("2 -> 1 replicas (CapacityUnavailable)")
    running_alone = go(shrunk, T0 + 9, *running(3, 0), ReplicaObservation(1, 3, phase="pending"))
    grown = go(running_alone, T0 + 30, *running(3, 0, 1))
    assert [e.reason for e in transitions.events(running_alone, grown)] == [
        "GroupGrown",
        "GroupRestarted",
    ]


def test_a_key_dropped_from_the_group_is_removed_by_the_merge_patch() -> None:
    old = {"group": {"attempt": 3, "replicas": 2, "kept": [0, 2], "members": [0, 2]}}
    new = {"group": {"attempt": 4, "replicas": 3, "kept": [0, 1, 2]}}
    patch = transitions.status_patch(old, new)
    assert patch == {"group": {"attempt": 4, "replicas": 3, "kept": [0, 1, 2], "members": None}}
