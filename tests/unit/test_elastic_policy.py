"""Elastic groups in the lifecycle policy: give up an unschedulable replacement, grow back."""

from __future__ import annotations

from typing import Any

import pytest

from spotrun.lifecycle import JobSpec, Observation, ReplicaObservation, RestartGroup, Wait, plan
from spotrun.lifecycle.backoff import consecutive
from spotrun.lifecycle.group import GroupRecord
from spotrun.lifecycle.spec import Elastic

T0 = 1_700_000_000.0
ELASTIC = JobSpec(replicas=4, elastic=Elastic(min_replicas=2, wait_seconds=30))


def running(index: int, attempt: int) -> ReplicaObservation:
    return ReplicaObservation(index, attempt, phase="running", ready=True)


def lost(index: int, attempt: int) -> ReplicaObservation:
    return ReplicaObservation(
        index, attempt, phase="failed", preempted=True, preemption_reason="NodeShutdown"
    )


def unschedulable(index: int, attempt: int) -> ReplicaObservation:
    return ReplicaObservation(
        index, attempt, phase="pending", waiting_reason="Unschedulable", message="0/3 nodes"
    )


def creating(index: int, attempt: int) -> ReplicaObservation:
    return ReplicaObservation(index, attempt, phase="pending", waiting_reason="ContainerCreating")


def step(spec: JobSpec, status: dict[str, Any], at: float, *replicas: ReplicaObservation) -> Any:
    return plan(spec, status, Observation(T0 + at, replicas))


def preempted_one(spec: JobSpec = ELASTIC) -> dict[str, Any]:
    """Attempt 1 ran with 4 replicas; replica 1 was lost; attempt 2 keeps 0, 2 and 3."""
    status = step(spec, {}, 0).status
    status = step(spec, status, 1, *(running(i, 1) for i in range(4))).status
    decision = step(spec, status, 50, running(0, 1), lost(1, 1), running(2, 1), running(3, 1))
    assert decision.status["attempt"] == 2 and decision.status["group"]["kept"] == [0, 2, 3]
    return dict(decision.status)


def shrunk(spec: JobSpec = ELASTIC) -> dict[str, Any]:
    status = preempted_one(spec)
    survivors = (running(0, 2), unschedulable(1, 2), running(2, 2), running(3, 2))
    return dict(step(spec, status, 50 + 31, *survivors).status)


def test_an_unschedulable_replacement_is_waited_for_until_wait_seconds() -> None:
    status = preempted_one()
    decision = step(ELASTIC, status, 60, running(0, 2), unschedulable(1, 2), running(2, 2))
    assert decision.status["attempt"] == 2
    waits = [a for a in decision.actions if isinstance(a, Wait)]
    assert waits and waits[0].until == T0 + 50 + 30 and waits[0].reason == "ElasticWait"
    running_condition = next(c for c in decision.status["conditions"] if c["type"] == "Running")
    assert running_condition["reason"] == "WaitingForCapacity"
    assert "cannot be scheduled" in running_condition["message"]


def test_after_wait_seconds_the_survivors_go_on_as_a_smaller_group() -> None:
    status = shrunk()
    record = GroupRecord.from_status(status)
    # One preemption 81 s into the job: the next cadences assume it of the next one.
    assert record == GroupRecord(3, "warm", 3, (0, 2, 3), members=(0, 2, 3), mtbf_seconds=81.0)
    assert record.node_rank_of(2) == 1 and record.node_rank_of(1) is None
    assert status["size"] == "3/4" and status["state"] == "Restarting"
    entry = status["interruptions"][-1]
    assert entry["kind"] == "resize" and entry["reason"] == "CapacityUnavailable"
    assert (entry["fromReplicas"], entry["toReplicas"]) == (4, 3)
    assert status["preemptions"] == 1 and status["failures"] == 0  # a resize spends no budget


def test_the_shrink_goes_out_as_a_warm_restart_keeping_the_survivors() -> None:
    status = preempted_one()
    decision = step(
        ELASTIC, status, 81, running(0, 2), unschedulable(1, 2), running(2, 2), running(3, 2)
    )
    restarts = [a for a in decision.actions if isinstance(a, RestartGroup)]
    assert restarts == [RestartGroup(3, None, "CapacityUnavailable", T0 + 81, (0, 2, 3))]


def test_the_smaller_group_runs_and_the_ledger_closes_both_entries() -> None:
    status = shrunk()
    decision = step(
        ELASTIC, status, 85, running(0, 3), unschedulable(1, 3), running(2, 3), running(3, 3)
    )
    status = decision.status
    assert status["state"] == "Running" and status["readyReplicas"] == 3
    assert all("secondsToRecover" in e for e in status["interruptions"][-2:])
    pods_ready = next(c for c in status["conditions"] if c["type"] == "PodsReady")
    assert pods_ready["status"] == "True"  # the replica outside the group is not waited for
    assert consecutive(status["interruptions"]) == 0  # neither entry is a failure in a row


def test_a_replica_that_runs_again_grows_the_group_back() -> None:
    status = step(
        ELASTIC, shrunk(), 85, running(0, 3), unschedulable(1, 3), running(2, 3), running(3, 3)
    ).status
    decision = step(ELASTIC, status, 120, *(running(i, 3) for i in range(4)))
    status = decision.status
    assert status["attempt"] == 4 and status["state"] == "Restarting"
    record = GroupRecord.from_status(status)
    assert record == GroupRecord(4, "warm", 4, (0, 1, 2, 3), mtbf_seconds=120.0)  # the whole group
    assert status["size"] == "4/4"
    entry = status["interruptions"][-1]
    assert (entry["kind"], entry["reason"]) == ("resize", "CapacityReturned")
    assert (entry["fromReplicas"], entry["toReplicas"]) == (3, 4)
    (restart,) = [a for a in decision.actions if isinstance(a, RestartGroup)]
    assert restart.keep == (0, 1, 2, 3)
    again = step(ELASTIC, status, 125, *(running(i, 4) for i in range(4))).status
    assert again["state"] == "Running" and again["size"] == "4/4"


def test_a_starting_replacement_is_not_given_up() -> None:
    # Scheduled, pulling its image: capacity exists, the group waits for it.
    status = preempted_one()
    decision = step(
        ELASTIC, status, 500, running(0, 2), creating(1, 2), running(2, 2), running(3, 2)
    )
    assert decision.status["attempt"] == 2 and "size" in decision.status
    assert decision.status["size"] == "4/4"


def test_never_below_min_replicas() -> None:
    spec = JobSpec(replicas=2, elastic=Elastic(min_replicas=2, wait_seconds=10))
    status = step(spec, {}, 0).status
    status = step(spec, status, 1, running(0, 1), running(1, 1)).status
    status = step(spec, status, 50, running(0, 1), lost(1, 1)).status
    decision = step(spec, status, 500, running(0, 2), unschedulable(1, 2))
    assert decision.status["attempt"] == 2 and decision.status["size"] == "2/2"


def test_without_elastic_the_group_waits_for_its_replacement() -> None:
    spec = JobSpec(replicas=4)
    status = preempted_one(spec)
    decision = step(
        spec, status, 5000, running(0, 2), unschedulable(1, 2), running(2, 2), running(3, 2)
    )
    assert decision.status["attempt"] == 2
    assert not any(isinstance(a, Wait) and a.reason == "ElasticWait" for a in decision.actions)


def test_a_member_lost_from_a_shrunk_group_is_replaced_within_the_same_members() -> None:
    status = step(
        ELASTIC, shrunk(), 85, running(0, 3), unschedulable(1, 3), running(2, 3), running(3, 3)
    ).status
    decision = step(
        ELASTIC, status, 200, running(0, 3), unschedulable(1, 3), lost(2, 3), running(3, 3)
    )
    record = GroupRecord.from_status(decision.status)
    assert record == GroupRecord(4, "warm", 3, (0, 3), members=(0, 2, 3), mtbf_seconds=100.0)
    # The lost member's replacement cannot be scheduled either: down to two.
    later = step(
        ELASTIC,
        decision.status,
        231,
        running(0, 4),
        unschedulable(1, 4),
        unschedulable(2, 4),
        running(3, 4),
    )
    # Two preemptions in 231 s (a resize is no interruption of the work).
    assert GroupRecord.from_status(later.status) == GroupRecord(
        5, "warm", 2, (0, 3), members=(0, 3), mtbf_seconds=115.5
    )
    assert later.status["size"] == "2/4"


@pytest.mark.parametrize(
    "raw",
    [
        {"attempt": 2, "mode": "warm", "replicas": 2, "members": [0, 0]},
        {"attempt": 2, "mode": "warm", "replicas": 2, "members": [0, 1, 2]},
        {"attempt": 2, "mode": "warm", "replicas": 2, "members": [-1, 1]},
    ],
)
def test_a_group_record_with_members_that_make_no_group_reads_as_none(raw: object) -> None:
    assert GroupRecord.from_status({"group": raw}) is None


def test_a_replica_kept_outside_the_members_is_a_spare_that_goes_on_waiting() -> None:
    raw = {"attempt": 2, "mode": "warm", "replicas": 2, "members": [0, 2], "kept": [0, 1, 2]}
    record = GroupRecord.from_status({"group": raw})
    assert record is not None
    assert record.keeps(1) and record.node_rank_of(1) is None
    assert (record.node_rank_of(0), record.node_rank_of(2)) == (0, 1)
