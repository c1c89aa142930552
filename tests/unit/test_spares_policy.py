"""Warm spares (spec.spares) in the lifecycle policy: a waiting pod takes a lost member's place."""

from __future__ import annotations

from typing import Any

from spotrun.lifecycle import JobSpec, Observation, ReplicaObservation, RestartGroup, plan
from spotrun.lifecycle.group import GroupRecord

T0 = 1_700_000_000.0
SPARES = JobSpec(replicas=3, spares=1)


def running(index: int, attempt: int) -> ReplicaObservation:
    return ReplicaObservation(index, attempt, phase="running", ready=True)


def lost(index: int, attempt: int) -> ReplicaObservation:
    return ReplicaObservation(
        index, attempt, phase="failed", preempted=True, preemption_reason="NodeShutdown"
    )


def pending(index: int, attempt: int) -> ReplicaObservation:
    return ReplicaObservation(index, attempt, phase="pending", waiting_reason="ContainerCreating")


def step(spec: JobSpec, status: dict[str, Any], at: float, *replicas: ReplicaObservation) -> Any:
    return plan(spec, status, Observation(T0 + at, replicas))


def started(spec: JobSpec = SPARES) -> dict[str, Any]:
    """Attempt 1 runs: members 0-2 and the spare, pod 3."""
    status = step(spec, {}, 0).status
    status = step(spec, status, 1, *(running(i, 1) for i in range(spec.pool))).status
    assert status["state"] == "Running"
    return dict(status)


def test_the_job_runs_its_spares_beside_the_group_and_does_not_wait_for_them() -> None:
    assert SPARES.pool == 4
    status = step(SPARES, {}, 0).status
    status = step(SPARES, status, 1, *(running(i, 1) for i in range(3)), pending(3, 1)).status
    assert status["state"] == "Running" and status["size"] == "3/3"
    record = GroupRecord.from_status(status)
    assert record is not None and record.indices == (0, 1, 2)
    assert record.node_rank_of(3) is None


def test_a_waiting_spare_takes_the_lost_members_place_and_every_waiting_pod_stays() -> None:
    status = started()
    decision = step(SPARES, status, 50, running(0, 1), lost(1, 1), running(2, 1), running(3, 1))
    record = GroupRecord.from_status(decision.status)
    # The spare takes node rank 1, the lost member's; the survivors keep theirs.
    assert record == GroupRecord(2, "warm", 3, (0, 2, 3), members=(0, 3, 2), mtbf_seconds=50.0)
    assert record.node_rank_of(3) == 1
    restarts = [a for a in decision.actions if isinstance(a, RestartGroup)]
    assert restarts and restarts[0].keep == (0, 2, 3)  # pod 1 is replaced; pods 0, 2, 3 stay
    assert decision.status["interruptions"][-1]["recovery"] == "warm"
    assert decision.status["preemptions"] == 1


def test_the_replaced_pod_waits_as_the_next_spare_and_the_group_runs_without_it() -> None:
    status = step(
        SPARES, started(), 50, running(0, 1), lost(1, 1), running(2, 1), running(3, 1)
    ).status
    # Pod 1 comes back from the new template (attempt 2); it is no member, so not waited for.
    decision = step(SPARES, status, 52, running(0, 2), pending(1, 2), running(2, 2), running(3, 2))
    assert decision.status["state"] == "Running" and decision.status["readyReplicas"] == 3
    assert decision.status["size"] == "3/3"
    # The next loss, of the promoted spare: pod 1 (waiting again) takes its place, node rank 1.
    status = step(SPARES, decision.status, 60, *(running(i, 2) for i in range(4))).status
    decision = step(SPARES, status, 70, running(0, 2), running(1, 2), running(2, 2), lost(3, 2))
    record = GroupRecord.from_status(decision.status)
    # Members 0, 1, 2: written as none. Two preemptions in 70 s.
    assert record == GroupRecord(3, "warm", 3, (0, 1, 2), mtbf_seconds=35.0)
    assert "members" not in decision.status["group"]


def test_without_a_waiting_spare_the_lost_members_replacement_is_waited_for() -> None:
    status = started()
    decision = step(SPARES, status, 50, running(0, 1), lost(1, 1), running(2, 1), pending(3, 1))
    record = GroupRecord.from_status(decision.status)
    assert record == GroupRecord(2, "warm", 3, (0, 2), mtbf_seconds=50.0)
    assert record.indices == (0, 1, 2)


def test_a_spare_that_is_lost_interrupts_nothing() -> None:
    status = started()
    decision = step(SPARES, status, 50, *(running(i, 1) for i in range(3)), lost(3, 1))
    assert decision.status["state"] == "Running" and decision.status["attempt"] == 1
    assert decision.status["preemptions"] == 0
    assert not [a for a in decision.actions if isinstance(a, RestartGroup)]


def test_a_failure_restarts_the_whole_pool_cold() -> None:
    status = started()
    crashed = ReplicaObservation(1, 1, phase="failed", exit_code=1)
    decision = step(SPARES, status, 50, running(0, 1), crashed, running(2, 1), running(3, 1))
    assert decision.status["state"] == "Restarting" and decision.status["failures"] == 1
    later = step(
        SPARES, decision.status, 50 + 3600, running(0, 1), crashed, running(2, 1), running(3, 1)
    )
    record = GroupRecord.from_status(later.status)
    assert record == GroupRecord(2, "cold", 3, mtbf_seconds=3650.0)


def test_without_spares_the_policy_is_unchanged() -> None:
    spec = JobSpec(replicas=3)
    status = step(spec, {}, 0).status
    status = step(spec, status, 1, *(running(i, 1) for i in range(3))).status
    # A stray pod 3 (a StatefulSet being scaled down) is not a spare.
    decision = step(spec, status, 50, running(0, 1), lost(1, 1), running(2, 1), running(3, 1))
    assert GroupRecord.from_status(decision.status) == GroupRecord(
        2, "warm", 3, (0, 2), mtbf_seconds=50.0
    )


# -- spec.spares changed on a running job ----------------------------------------------------


def test_the_pool_follows_spec_spares_and_never_drops_a_member() -> None:
    from spotrun.lifecycle import pool_size

    status = started()
    assert pool_size(SPARES, status) == 4
    assert pool_size(JobSpec(replicas=3, spares=3), status) == 6  # raised: two more pods
    # The spare (pod 3) took member 1's place; spec.spares is then lowered to 0.
    status = step(
        SPARES, status, 50, running(0, 1), lost(1, 1), running(2, 1), running(3, 1)
    ).status
    lowered = JobSpec(replicas=3)
    assert pool_size(lowered, status) == 4  # pod 3 is a member: the set cannot drop it yet
    assert pool_size(SPARES, {}) == 4


def test_lowered_spares_hand_a_members_place_beyond_the_pool_to_a_spare_inside_it() -> None:
    from spotrun.lifecycle import pool_size

    status = step(
        SPARES, started(), 50, running(0, 1), lost(1, 1), running(2, 1), running(3, 1)
    ).status
    status = step(
        SPARES, status, 52, running(0, 2), pending(1, 2), *(running(i, 2) for i in (2, 3))
    ).status
    assert status["state"] == "Running" and status["group"]["members"] == [0, 3, 2]
    lowered = JobSpec(replicas=3)
    # spec.spares is 0 now; pod 1 (the replacement) still starts: nothing to swap yet.
    waiting = step(
        lowered, status, 55, running(0, 2), pending(1, 2), *(running(i, 2) for i in (2, 3))
    )
    assert waiting.status["attempt"] == 2
    # Pod 1 runs: a warm attempt puts it in member 3's node rank; pod 3 is not kept.
    decision = step(lowered, waiting.status, 60, *(running(i, 2) for i in range(4)))
    record = GroupRecord.from_status(decision.status)
    assert record is not None and record.attempt == 3 and record.mode == "warm"
    assert record.indices == (0, 1, 2) and "members" not in decision.status["group"]
    (restart,) = [a for a in decision.actions if isinstance(a, RestartGroup)]
    assert restart.keep == (0, 1, 2)
    entry = decision.status["interruptions"][-1]
    assert (entry["kind"], entry["reason"]) == ("resize", "SparesLowered")
    assert "spare 1" in entry["message"] and "member 3" in entry["message"]
    assert decision.status["preemptions"] == 1  # a resize spends no budget
    assert pool_size(lowered, decision.status) == 3  # and the set can shrink to the pool
    settled = step(lowered, decision.status, 62, *(running(i, 3) for i in range(3)))
    assert settled.status["state"] == "Running" and settled.status["size"] == "3/3"


def test_the_status_counts_the_waiting_spares_while_the_job_runs() -> None:
    status = started()
    assert status["spares"] == "1/1"
    # The spare is promoted; the lost pod's replacement still starts: none waits.
    status = step(
        SPARES, status, 50, running(0, 1), lost(1, 1), running(2, 1), running(3, 1)
    ).status
    status = step(
        SPARES, status, 52, running(0, 2), pending(1, 2), running(2, 2), running(3, 2)
    ).status
    assert status["spares"] == "0/1"
    status = step(SPARES, status, 55, *(running(i, 2) for i in range(4))).status
    assert status["spares"] == "1/1"
    assert "spares" not in step(JobSpec(replicas=3), {}, 0).status


def test_a_spare_that_runs_while_a_replacement_waits_takes_its_place() -> None:
    """Two members lost one after the other with one spare: the second loss waits for its
    replacement. When capacity for one pod returns and the scheduler places the other
    pending pod (not a member), that pod takes the place: the group does not wait on."""
    spec = JobSpec(replicas=2, spares=1)
    status = step(spec, {}, 0).status
    status = step(spec, status, 1, *(running(i, 1) for i in range(3))).status
    status = step(spec, status, 20, running(0, 1), lost(1, 1), running(2, 1)).status
    assert status["group"]["members"] == [0, 2]
    unschedulable = ReplicaObservation(1, 2, phase="pending", waiting_reason="Unschedulable")
    status = step(spec, status, 22, running(0, 2), unschedulable, running(2, 2)).status
    assert status["state"] == "Running" and status["spares"] == "0/1"
    # Member 0 is lost too; no spare waits: attempt 3 waits for pod 0's replacement.
    status = step(spec, status, 40, lost(0, 2), unschedulable, running(2, 2)).status
    assert GroupRecord.from_status(status) is not None and status["attempt"] == 3
    assert status["group"]["members"] == [0, 2] and status["group"]["kept"] == [2]
    no_room = ReplicaObservation(0, 3, phase="pending", waiting_reason="Unschedulable")
    # The survivor still carries attempt 2's label: it is kept, never given up.
    waiting = step(spec, status, 41, no_room, pending(1, 3), running(2, 2))
    assert waiting.status["attempt"] == 3
    # Pod 1 schedules first (one node came back): it takes replica 0's node rank.
    decision = step(spec, waiting.status, 45, no_room, running(1, 3), running(2, 3))
    record = GroupRecord.from_status(decision.status)
    assert record is not None and record.attempt == 4 and record.mode == "warm"
    assert record.indices == (1, 2) and record.kept == (1, 2)
    entry = decision.status["interruptions"][-1]
    assert (entry["kind"], entry["reason"]) == ("resize", "SparePromoted")
    assert decision.status["preemptions"] == 2  # the promotion spends no budget
    settled = step(spec, decision.status, 47, no_room, running(1, 4), running(2, 4)).status
    assert settled["state"] == "Running" and settled["size"] == "2/2"
    assert all("secondsToRecover" in e for e in settled["interruptions"])


def cold_restarted() -> dict[str, Any]:
    """Member 1 failed: after its backoff, attempt 2 restarts the whole pool cold."""
    status = started()
    failed = ReplicaObservation(1, 1, phase="failed", exit_code=1, reason="Error")
    status = step(SPARES, status, 10, running(0, 1), failed, running(2, 1), running(3, 1)).status
    status = step(SPARES, status, 500, running(0, 1), failed, running(2, 1), running(3, 1)).status
    assert status["attempt"] == 2 and status["group"]["mode"] == "cold"
    return dict(status)


def test_a_cold_restart_is_not_turned_into_a_promotion() -> None:
    status = cold_restarted()
    # The spare's pod runs first, the members' still start: the cold restart waits for them.
    later = step(SPARES, status, 505, *(pending(i, 2) for i in range(3)), running(3, 2))
    assert later.status["attempt"] == 2 and later.status["group"]["mode"] == "cold"
    assert not any(e["kind"] == "resize" for e in later.status["interruptions"])


def test_a_first_group_starts_around_a_member_the_scheduler_cannot_place() -> None:
    """2 replicas and a spare on 2 free GPUs: the scheduler placed pods 0 and 2. Pod 2 takes
    member 1's node rank (SparePromoted) instead of idling while the group waits."""
    spec = JobSpec(replicas=2, spares=1)
    status = step(spec, {}, 0).status
    no_room = ReplicaObservation(1, 1, phase="pending", waiting_reason="Unschedulable")
    decision = step(spec, status, 2, running(0, 1), no_room, running(2, 1))
    record = GroupRecord.from_status(decision.status)
    assert record is not None and (record.attempt, record.mode) == (2, "warm")
    assert record.indices == (0, 2) and record.kept == (0, 2)
    (entry,) = decision.status["interruptions"]
    assert (entry["kind"], entry["reason"]) == ("resize", "SparePromoted"), entry
    assert "spare 2 takes replica 1's place: it cannot be scheduled" in entry["message"]
    assert (decision.status["preemptions"], decision.status["failures"]) == (0, 0)
    (restart,) = [a for a in decision.actions if isinstance(a, RestartGroup)]
    assert restart.keep == (0, 2)
    # The new attempt runs with pods 0 and 2; pod 1, recreated, waits as the spare.
    no_room = ReplicaObservation(1, 2, phase="pending", waiting_reason="Unschedulable")
    settled = step(spec, decision.status, 4, running(0, 2), no_room, running(2, 2)).status
    assert settled["state"] == "Running" and settled["size"] == "2/2"
    assert settled["attempt"] == 2


def test_a_first_group_waits_for_members_that_are_only_starting() -> None:
    """Pods being created or pulled are not a lack of capacity: no swap, no new attempt."""
    spec = JobSpec(replicas=2, spares=1)
    status = step(spec, {}, 0).status
    decision = step(spec, status, 2, running(0, 1), pending(1, 1), running(2, 1))
    assert decision.status["attempt"] == 1 and "interruptions" not in decision.status
    # No spare runs: nothing to start around either.
    no_room = ReplicaObservation(1, 1, phase="pending", waiting_reason="Unschedulable")
    decision = step(spec, status, 2, running(0, 1), no_room, pending(2, 1))
    assert decision.status["attempt"] == 1


def test_a_cold_restart_starts_around_a_member_the_scheduler_cannot_place() -> None:
    status = cold_restarted()
    no_room = ReplicaObservation(1, 2, phase="pending", waiting_reason="Unschedulable")
    decision = step(SPARES, status, 505, running(0, 2), no_room, running(2, 2), running(3, 2))
    record = GroupRecord.from_status(decision.status)
    assert record is not None and record.attempt == 3 and record.indices == (0, 3, 2)
    assert decision.status["interruptions"][-1]["reason"] == "SparePromoted"
    assert decision.status["failures"] == 1  # the promotion spends nothing more
