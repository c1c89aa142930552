"""Warm spares with an elastic group: a spare fills a lost place first, the group shrinks
only when neither a spare nor the replacement comes, and grows back from any pod of the pool."""

from __future__ import annotations

import dataclasses
from typing import Any

from spotrun.lifecycle import JobSpec, Observation, ReplicaObservation, RestartGroup, plan
from spotrun.lifecycle.group import GroupRecord
from spotrun.lifecycle.spec import Elastic
from tests.unit.test_elastic_policy import lost, running, unschedulable

T0 = 1_700_000_000.0
# A group of 3 with one spare (pods 0-3); it may train with 2.
SPEC = JobSpec(replicas=3, spares=1, elastic=Elastic(min_replicas=2, wait_seconds=30))


def step(status: dict[str, Any], at: float, *replicas: ReplicaObservation) -> Any:
    return plan(SPEC, status, Observation(T0 + at, replicas))


def group(status: dict[str, Any]) -> GroupRecord | None:
    """status.group without its MTBF (the ledger's own tests pin that)."""
    record = GroupRecord.from_status(status)
    return None if record is None else dataclasses.replace(record, mtbf_seconds=None)


def started() -> dict[str, Any]:
    status = step({}, 0).status
    status = step(status, 1, *(running(i, 1) for i in range(SPEC.pool))).status
    assert status["state"] == "Running" and status["size"] == "3/3"
    return dict(status)


def spare_promoted() -> dict[str, Any]:
    """Member 1 is lost; the spare, pod 3, takes node rank 1 in attempt 2."""
    decision = step(started(), 50, running(0, 1), lost(1, 1), running(2, 1), running(3, 1))
    record = group(decision.status)
    assert record == GroupRecord(2, "warm", 3, (0, 2, 3), members=(0, 3, 2))
    return dict(decision.status)


def shrunk() -> dict[str, Any]:
    """After the promotion member 2 is lost too, with no spare left and no capacity: the
    group waits waitSeconds for pod 2's replacement, then goes on with 0 and 3."""
    status = step(
        spare_promoted(), 52, running(0, 2), unschedulable(1, 2), *(running(i, 2) for i in (2, 3))
    ).status
    assert status["state"] == "Running"
    status = step(status, 60, running(0, 2), unschedulable(1, 2), lost(2, 2), running(3, 2)).status
    record = GroupRecord.from_status(status)
    assert record is not None and record.attempt == 3 and record.indices == (0, 3, 2)
    waiting = (running(0, 3), unschedulable(1, 3), unschedulable(2, 3), running(3, 3))
    early = step(status, 80, *waiting)
    assert early.status["attempt"] == 3  # within waitSeconds: still waiting for pod 2
    decision = step(early.status, 91, *waiting)
    return dict(decision.status)


def test_a_waiting_spare_takes_the_place_before_any_shrink() -> None:
    status = spare_promoted()
    assert status["size"] == "3/3"
    assert status["interruptions"][-1]["recovery"] == "warm"


def test_without_spare_or_capacity_the_group_shrinks_keeping_its_node_ranks() -> None:
    status = shrunk()
    record = group(status)
    # Replica 2 given up: the survivors 0 and 3 go on, in their node-rank order.
    assert record == GroupRecord(4, "warm", 2, (0, 3), members=(0, 3))
    assert status["size"] == "2/3"
    entry = status["interruptions"][-1]
    assert (entry["kind"], entry["reason"]) == ("resize", "CapacityUnavailable")
    assert (entry["fromReplicas"], entry["toReplicas"]) == (3, 2)


def test_a_spare_that_comes_up_during_the_wait_takes_the_place_instead_of_a_shrink() -> None:
    status = step(
        spare_promoted(), 52, running(0, 2), unschedulable(1, 2), *(running(i, 2) for i in (2, 3))
    ).status
    status = step(status, 60, running(0, 2), unschedulable(1, 2), lost(2, 2), running(3, 2)).status
    # Pod 1 (the spare-to-be, recreated from attempt 3's template) schedules after all,
    # well within waitSeconds: it takes the place at once, and nothing shrinks.
    decision = step(status, 65, running(0, 3), running(1, 3), unschedulable(2, 3), running(3, 3))
    record = group(decision.status)
    assert record == GroupRecord(4, "warm", 3, (0, 1, 3), members=(0, 3, 1))
    assert decision.status["size"] == "3/3"
    entry = decision.status["interruptions"][-1]
    assert (entry["reason"], entry["fromReplicas"], entry["toReplicas"]) == ("SparePromoted", 3, 3)
    assert "spare 1 takes replica 2's place" in entry["message"]


def test_the_group_grows_back_from_any_pod_of_the_pool_and_the_rest_wait_as_spares() -> None:
    status = shrunk()
    status = step(
        status, 95, running(0, 4), unschedulable(1, 4), unschedulable(2, 4), running(3, 4)
    ).status
    assert status["state"] == "Running" and status["size"] == "2/3"
    # Capacity returns: pods 1 and 2 both run, outside the group. One joins (the lowest
    # ordinal), the group is whole again, and the other goes on waiting as the spare.
    decision = step(status, 120, *(running(i, 4) for i in range(4)))
    record = group(decision.status)
    assert record == GroupRecord(5, "warm", 3, (0, 1, 2, 3), members=(0, 1, 3))
    (restart,) = [a for a in decision.actions if isinstance(a, RestartGroup)]
    assert restart.keep == (0, 1, 2, 3)  # every running pod stays; none is replaced
    entry = decision.status["interruptions"][-1]
    assert (entry["reason"], entry["fromReplicas"], entry["toReplicas"]) == (
        "CapacityReturned",
        2,
        3,
    )
    again = step(decision.status, 125, *(running(i, 5) for i in range(4))).status
    assert again["state"] == "Running" and again["size"] == "3/3"
    # And the next loss is a promotion again: pod 2 takes member 1's node rank.
    later = step(again, 140, running(0, 5), lost(1, 5), running(2, 5), running(3, 5))
    record = GroupRecord.from_status(later.status)
    assert record is not None and record.indices == (0, 2, 3) and record.kept == (0, 2, 3)


def test_a_whole_group_of_other_ordinals_is_written_with_its_members() -> None:
    status = shrunk()
    status = step(
        status, 95, running(0, 4), unschedulable(1, 4), unschedulable(2, 4), running(3, 4)
    ).status
    # Only pod 1 returns: the group is whole again as pods 0, 1 and 3, so members stay.
    grown = step(status, 120, running(0, 4), running(1, 4), unschedulable(2, 4), running(3, 4))
    assert grown.status["group"]["members"] == [0, 1, 3]
