"""plan(): every transition of the state diagram, budgets, backoff, and idempotency."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import pytest

from spotrun.lifecycle import (
    OWNED_FIELDS,
    DeleteJob,
    Fail,
    JobSpec,
    Observation,
    Plan,
    ReplicaObservation,
    RestartGroup,
    StartGroup,
    Succeed,
    Suspend,
    Wait,
    format_time,
    plan,
)
from spotrun.lifecycle.conditions import find
from spotrun.lifecycle.spec import Backoff, CircuitBreaker, FailurePolicy

T0 = 1_700_000_000.0
STORAGE = "gs://bucket/runs"


# -- builders -------------------------------------------------------------------------


def make_spec(
    replicas: int = 2,
    resume_from: str | None = None,
    ttl: float | None = None,
    grace: float = 30.0,
    recovery: str = "cold",
    **policy: Any,
) -> JobSpec:
    """A JobSpec; `policy` goes to FailurePolicy. Backoff: 10s doubling to 300s, no jitter.

    Cold recovery unless asked: most tables here pin the group-wide restart; the warm
    recovery's own tests ask for it.
    """
    policy.setdefault("backoff", Backoff(initial_seconds=10.0, max_seconds=300.0, jitter=0.0))
    return JobSpec(
        replicas=replicas,
        resume_from=resume_from,
        failure_policy=FailurePolicy(**policy),
        ttl_seconds_after_finished=ttl,
        grace_seconds=grace,
        recovery=recovery,  # type: ignore[arg-type]
    )


def running(index: int, attempt: int = 1, **fields: Any) -> ReplicaObservation:
    fields.setdefault("ready", True)
    return ReplicaObservation(index, attempt, phase="running", **fields)


def pending(index: int, attempt: int = 1, **fields: Any) -> ReplicaObservation:
    return ReplicaObservation(index, attempt, phase="pending", **fields)


def oom(index: int, attempt: int = 1) -> ReplicaObservation:
    return running(index, attempt, ready=False, restarts=1, exit_code=137, reason="OOMKilled")


def crashed(index: int, attempt: int = 1) -> ReplicaObservation:
    return ReplicaObservation(index, attempt, phase="failed", exit_code=1, reason="Error")


def preempted(
    index: int, attempt: int = 1, phase: str = "failed", reason: str = "TerminationByKubelet"
) -> ReplicaObservation:
    return ReplicaObservation(
        index,
        attempt,
        phase=phase,  # type: ignore[arg-type]
        preempted=True,
        preemption_reason=reason,
    )


def deleting(replica: ReplicaObservation) -> ReplicaObservation:
    return ReplicaObservation(**{**replica.__dict__, "deleting": True})


class Job:
    """A TrainJob under the policy: plans each observation and keeps the status it returns."""

    def __init__(
        self,
        spec: JobSpec | None = None,
        status: dict[str, Any] | None = None,
        jitter: random.Random | float = 0.0,
    ) -> None:
        self.spec = spec or make_spec()
        self.status: dict[str, Any] = status or {}
        self.jitter = jitter
        self.last: Plan | None = None
        self.observation: Observation | None = None

    def see(
        self,
        *replicas: ReplicaObservation,
        at: float,
        progress: float | None = None,
        completed: bool = False,
        suspended: bool = False,
        generation: int = 1,
    ) -> Plan:
        self.observation = Observation(at, replicas, progress, completed, suspended, generation)
        self.last = plan(self.spec, self.status, self.observation, self.jitter)
        self.status = self.last.status
        return self.last

    def group(self, attempt: int) -> tuple[ReplicaObservation, ...]:
        return tuple(running(i, attempt) for i in range(self.spec.replicas))

    def started(self, at: float = T0) -> Job:
        """Drives the job to Running as attempt 1."""
        self.see(at=at)
        self.see(*self.group(1), at=at + 1)
        assert self.state == "Running"
        return self

    def interrupted(self, *replicas: ReplicaObservation, at: float) -> Job:
        """Shows the interruption, then the end of its backoff: the restart goes out."""
        self.see(*replicas, at=at)
        assert self.state == "Restarting", self.status
        self.see(*replicas, at=at + 1000)
        return self

    def restarted(self, at: float) -> Job:
        """The new attempt's replicas all run."""
        self.see(*self.group(self.attempt), at=at)
        return self

    @property
    def state(self) -> str:
        return str(self.status["state"])

    @property
    def attempt(self) -> int:
        return int(self.status["attempt"])

    @property
    def actions(self) -> tuple[object, ...]:
        assert self.last is not None
        return self.last.actions

    def condition(self, type_: str) -> dict[str, Any]:
        found = find(self.status.get("conditions") or [], type_)
        assert found is not None, f"no {type_} condition in {self.status.get('conditions')}"
        return dict(found)


def with_checkpoint(
    status: dict[str, Any], step: int, uri: str | None = None, progress: int | None = None
) -> dict[str, Any]:
    """The status after the runtime recorded a checkpoint (and, optionally, later progress)."""
    uri = uri or f"{STORAGE}/default/job/ckpt-{step:06d}"
    out = {
        **status,
        "latestCheckpoint": {"uri": uri, "step": step, "attempt": status.get("attempt")},
    }
    if progress is not None:
        out["lastMetrics"] = {"step": progress, "loss": 0.1, "time": format_time(T0)}
    return out


# -- the transition table -------------------------------------------------------------
# Each row: a name, how to bring a job to the starting state, the observation that
# follows (as a function of the job), then the expected state and action types.

Setup = Callable[[], Job]
See = Callable[[Job], Plan]


def new() -> Job:
    return Job()


def pending_job() -> Job:
    job = Job()
    job.see(at=T0)
    return job


def running_job() -> Job:
    return Job().started()


def backing_off() -> Job:
    job = Job().started()
    job.see(running(0), oom(1), at=T0 + 100)
    return job


def restarting() -> Job:
    return Job().started().interrupted(running(0), oom(1), at=T0 + 100)


def suspended() -> Job:
    job = Job().started()
    job.see(at=T0 + 50, suspended=True)
    return job


def succeeded() -> Job:
    job = Job().started()
    job.see(*job.group(1), at=T0 + 50, completed=True)
    return job


def failed() -> Job:
    job = Job(make_spec(max_failures=0)).started()
    job.interrupted(running(0), oom(1), at=T0 + 100)
    assert job.state == "Failed"
    return job


TRANSITIONS: list[tuple[str, Setup, See, str, list[type]]] = [
    ("new -> Pending, start attempt 1", new, lambda j: j.see(at=T0), "Pending", [StartGroup]),
    (
        "new and suspended -> Suspended",
        new,
        lambda j: j.see(at=T0, suspended=True),
        "Suspended",
        [Suspend],
    ),
    (
        "Pending, nothing yet -> start again",
        pending_job,
        lambda j: j.see(at=T0 + 5),
        "Pending",
        [StartGroup],
    ),
    (
        "Pending, some running -> Pending",
        pending_job,
        lambda j: j.see(running(0), pending(1), at=T0 + 5),
        "Pending",
        [],
    ),
    (
        "Pending, all running -> Running",
        pending_job,
        lambda j: j.see(*j.group(1), at=T0 + 5),
        "Running",
        [],
    ),
    (
        "Pending, crash -> Restarting",
        pending_job,
        lambda j: j.see(crashed(0), pending(1), at=T0 + 5),
        "Restarting",
        [Wait],
    ),
    (
        "Pending, preempted -> Restarting",
        pending_job,
        lambda j: j.see(preempted(0, phase="pending"), pending(1), at=T0 + 5),
        "Restarting",
        [RestartGroup],  # a preemption restarts without backoff
    ),
    (
        "Pending, unschedulable -> Pending",
        pending_job,
        lambda j: j.see(pending(0, waiting_reason="Unschedulable"), pending(1), at=T0 + 5),
        "Pending",
        [],
    ),
    (
        "Running, all fine -> Running",
        running_job,
        lambda j: j.see(*j.group(1), at=T0 + 50),
        "Running",
        [],
    ),
    (
        "Running, preemption -> Restarting",
        running_job,
        lambda j: j.see(running(0), preempted(1), at=T0 + 50),
        "Restarting",
        [RestartGroup],  # a preemption restarts without backoff
    ),
    (
        "Running, failure -> Restarting",
        running_job,
        lambda j: j.see(running(0), oom(1), at=T0 + 50),
        "Restarting",
        [Wait],
    ),
    (
        "Running, vanished -> Restarting",
        running_job,
        lambda j: j.see(running(0), pending(1), at=T0 + 50),
        "Restarting",
        [RestartGroup],  # a preemption restarts without backoff
    ),
    (
        "Running, suspend -> Suspended",
        running_job,
        lambda j: j.see(*j.group(1), at=T0 + 50, suspended=True),
        "Suspended",
        [Suspend],
    ),
    (
        "Running, completed -> Succeeded",
        running_job,
        lambda j: j.see(*j.group(1), at=T0 + 50, completed=True),
        "Succeeded",
        [Succeed],
    ),
    (
        "Running, every replica exited 0 -> Succeeded",
        running_job,
        lambda j: j.see(
            *(ReplicaObservation(i, 1, phase="succeeded", exit_code=0) for i in range(2)),
            at=T0 + 50,
        ),
        "Succeeded",
        [Succeed],
    ),
    (
        "backoff, not over -> wait",
        backing_off,
        lambda j: j.see(running(0), oom(1), at=T0 + 105),
        "Restarting",
        [Wait],
    ),
    (
        "backoff over -> restart attempt 2",
        backing_off,
        lambda j: j.see(running(0), oom(1), at=T0 + 110),
        "Restarting",
        [RestartGroup],
    ),
    (
        "backoff, suspend -> Suspended",
        backing_off,
        lambda j: j.see(running(0), oom(1), at=T0 + 105, suspended=True),
        "Suspended",
        [Suspend],
    ),
    (
        "backoff, completed -> Succeeded",
        backing_off,
        lambda j: j.see(running(0), oom(1), at=T0 + 105, completed=True),
        "Succeeded",
        [Succeed],
    ),
    (
        "restarting, old replicas remain -> restart again",
        restarting,
        lambda j: j.see(running(0), oom(1), at=T0 + 1200),
        "Restarting",
        [RestartGroup],
    ),
    (
        "restarting, old deleting, new pending -> wait",
        restarting,
        lambda j: j.see(deleting(running(0)), pending(0, 2), pending(1, 2), at=T0 + 1200),
        "Restarting",
        [],
    ),
    (
        "restarting, new all running -> Running",
        restarting,
        lambda j: j.see(*j.group(2), at=T0 + 1200),
        "Running",
        [],
    ),
    (
        "restarting, new replica crashes -> Restarting",
        restarting,
        lambda j: j.see(crashed(0, 2), pending(1, 2), at=T0 + 1200),
        "Restarting",
        [Wait],
    ),
    (
        "Suspended, still suspended -> Suspended",
        suspended,
        lambda j: j.see(at=T0 + 60, suspended=True),
        "Suspended",
        [Suspend],
    ),
    (
        "Suspended, resumed -> Pending, attempt 2",
        suspended,
        lambda j: j.see(at=T0 + 60),
        "Pending",
        [StartGroup],
    ),
    (
        "Succeeded stays Succeeded",
        succeeded,
        lambda j: j.see(crashed(0), at=T0 + 60),
        "Succeeded",
        [Succeed],
    ),
    (
        "Failed stays Failed",
        failed,
        lambda j: j.see(*j.group(1), at=T0 + 2000, completed=True),
        "Failed",
        [Fail],
    ),
]


@pytest.mark.parametrize(
    ("setup", "observe", "state", "action_types"),
    [row[1:] for row in TRANSITIONS],
    ids=[row[0] for row in TRANSITIONS],
)
def test_transition(setup: Setup, observe: See, state: str, action_types: list[type]) -> None:
    job = setup()
    result = observe(job)
    assert job.state == state
    assert [type(a) for a in result.actions] == action_types
    # The whole table doubles as the idempotency check: a second pass with the same
    # observation and the status just returned changes nothing and asks for nothing new.
    assert job.observation is not None
    again = plan(job.spec, result.status, job.observation, job.jitter)
    assert again.status == result.status
    assert set(again.actions) <= set(result.actions)


# -- starting -------------------------------------------------------------------------


def test_new_job_starts_attempt_one_from_scratch() -> None:
    job = Job()
    result = job.see(at=T0)
    assert result.actions == (StartGroup(1, None),)
    assert job.status["startTime"] == format_time(T0)
    assert (job.status["preemptions"], job.status["failures"], job.status["readyReplicas"]) == (
        0,
        0,
        0,
    )
    assert job.condition("Running")["reason"] == "Starting"


def test_new_job_starts_from_spec_resume_from() -> None:
    job = Job(make_spec(resume_from="gs://old/run/ckpt-000009"))
    assert job.see(at=T0).actions == (StartGroup(1, "gs://old/run/ckpt-000009"),)


def test_running_when_every_replica_of_the_attempt_runs() -> None:
    job = Job().started(at=T0)
    assert job.status["attemptStartTime"] == format_time(T0 + 1)
    assert job.status["readyReplicas"] == 2
    assert job.condition("Running")["status"] == "True"
    assert job.condition("PodsReady") | {"lastTransitionTime": None} == {
        "type": "PodsReady",
        "status": "True",
        "reason": "AllReplicasReady",
        "message": "2/2 replicas ready",
        "lastTransitionTime": None,
        "observedGeneration": 1,
    }


def test_ready_replicas_count_only_the_current_attempt() -> None:
    job = restarting()
    job.see(running(0, 1), running(1, 1), running(0, 2), pending(1, 2), at=T0 + 1200)
    assert job.status["readyReplicas"] == 1


def test_start_time_is_kept_across_restarts() -> None:
    job = Job().started(at=T0).interrupted(running(0), oom(1), at=T0 + 100).restarted(at=T0 + 1200)
    assert job.status["startTime"] == format_time(T0)


# -- preemptions and failures -----------------------------------------------------------


def test_preemption_does_not_spend_failure_budget() -> None:
    job = Job(make_spec(max_failures=0)).started()
    for n in range(1, 6):
        at = T0 + n * 10_000
        job.interrupted(running(0, job.attempt), preempted(1, job.attempt), at=at).restarted(
            at=at + 1100
        )
        assert (job.state, job.status["preemptions"], job.status["failures"]) == ("Running", n, 0)
    assert job.attempt == 6


def test_failure_spends_failure_budget_and_names_the_reason() -> None:
    job = Job().started()
    job.see(running(0), oom(1), at=T0 + 100)
    assert (job.status["failures"], job.status["preemptions"]) == (1, 0)
    running_condition = job.condition("Running")
    assert (running_condition["status"], running_condition["reason"]) == ("False", "OOMKilled")
    entry = job.status["interruptions"][-1]
    assert (entry["kind"], entry["reason"], entry["attempt"]) == ("failure", "OOMKilled", 1)


def test_preemption_and_consequent_failures_count_one_preemption() -> None:
    job = Job(make_spec(replicas=3)).started()
    job.see(crashed(0), preempted(1, phase="running"), oom(2), at=T0 + 100)
    assert (job.status["preemptions"], job.status["failures"]) == (1, 0)
    assert len(job.status["interruptions"]) == 1


def test_an_interruption_is_counted_once_however_often_it_is_seen() -> None:
    job = Job().started()
    for at in (T0 + 100, T0 + 101, T0 + 105, T0 + 109):
        job.see(running(0), oom(1), at=at)
    assert job.status["failures"] == 1
    assert len(job.status["interruptions"]) == 1


def test_late_preemption_evidence_turns_a_failure_into_a_preemption() -> None:
    job = Job(make_spec(max_failures=0)).started()
    job.see(crashed(0), running(1), at=T0 + 100)
    assert job.status["failures"] == 1
    job.see(crashed(0), preempted(1, reason="NodeLost"), at=T0 + 105)
    assert (job.status["failures"], job.status["preemptions"]) == (0, 1)
    assert job.status["interruptions"][-1]["reason"] == "NodeLost"
    job.see(crashed(0), preempted(1, reason="NodeLost"), at=T0 + 200)
    assert job.state == "Restarting"
    assert job.actions == (RestartGroup(2, None, "NodeLost", T0 + 200),)


def test_old_attempt_signals_are_ignored_after_the_restart() -> None:
    job = restarting()
    job.see(crashed(0, 1), preempted(1, 1), pending(0, 2), pending(1, 2), at=T0 + 1200)
    assert (job.status["failures"], job.status["preemptions"]) == (1, 0)
    assert job.state == "Restarting"


def test_a_replica_replaced_behind_our_back_is_a_preemption() -> None:
    job = Job().started()
    job.see(running(0), pending(1), at=T0 + 100)
    assert job.status["preemptions"] == 1
    assert job.status["interruptions"][-1]["reason"] == "Vanished"


def test_a_new_attempt_preempted_before_it_runs_counts_again() -> None:
    job = restarting()
    job.see(pending(0, 2), preempted(1, 2, phase="pending"), at=T0 + 1200)
    assert (job.status["preemptions"], job.status["failures"]) == (1, 1)
    assert job.state == "Restarting"


def test_the_runtime_exit_after_a_preemption_notice_is_a_preemption() -> None:
    job = Job().started()
    job.see(running(0, restarts=1, exit_code=75), running(1, restarts=1, exit_code=75), at=T0 + 100)
    assert (job.status["preemptions"], job.status["failures"]) == (1, 0)
    assert job.status["interruptions"][-1]["reason"] == "PreemptionNotice"


# -- restarting -------------------------------------------------------------------------


def test_restart_waits_for_the_backoff() -> None:
    job = Job().started()
    assert job.see(running(0), oom(1), at=T0 + 100).actions == (Wait(T0 + 110, "Backoff"),)
    assert job.status["restartNotBefore"] == format_time(T0 + 110)
    assert job.attempt == 1
    assert job.see(running(0), oom(1), at=T0 + 109.9).actions == (Wait(T0 + 110, "Backoff"),)
    assert job.attempt == 1
    message = job.condition("Running")["message"]
    assert message.endswith(f"restarting as attempt 2 at {format_time(T0 + 110)}")


def test_restart_bumps_the_attempt_and_replaces_the_group() -> None:
    job = backing_off()
    result = job.see(running(0), oom(1), at=T0 + 110)
    assert result.actions == (RestartGroup(2, None, "OOMKilled", T0 + 110),)
    assert job.attempt == 2
    assert "restartNotBefore" not in job.status


def test_restart_resumes_from_latest_checkpoint() -> None:
    job = Job(make_spec(resume_from="gs://old/ckpt-000001")).started()
    job.status = with_checkpoint(job.status, step=300, progress=340)
    job.interrupted(running(0), preempted(1), at=T0 + 100)
    (restart,) = job.actions
    assert isinstance(restart, RestartGroup)
    assert restart.resume_from == f"{STORAGE}/default/job/ckpt-000300"
    assert job.status["interruptions"][-1]["stepsLost"] == 40


def test_restart_resumes_from_spec_resume_from_without_a_checkpoint() -> None:
    job = Job(make_spec(resume_from="gs://old/ckpt-000001")).started()
    job.interrupted(running(0), preempted(1), at=T0 + 100)
    (restart,) = job.actions
    assert isinstance(restart, RestartGroup) and restart.resume_from == "gs://old/ckpt-000001"


def test_steps_lost_count_from_zero_without_any_checkpoint() -> None:
    job = Job().started()
    job.status = {**job.status, "lastMetrics": {"step": 25}}
    job.interrupted(running(0), preempted(1), at=T0 + 100)
    assert job.status["interruptions"][-1]["stepsLost"] == 25


def test_restart_is_repeated_until_the_old_replicas_are_going() -> None:
    job = restarting()
    first = job.actions
    assert job.see(running(0), oom(1), at=T0 + 1500).actions == first
    assert job.attempt == 2
    assert job.see(deleting(running(0)), deleting(oom(1)), at=T0 + 1501).actions == first
    assert job.see(deleting(running(0)), pending(0, 2), pending(1, 2), at=T0 + 1502).actions == ()


def test_restart_is_done_when_all_replicas_belong_to_the_new_attempt() -> None:
    job = restarting()
    job.see(*job.group(2), at=T0 + 1200)
    assert job.state == "Running"
    entry = job.status["interruptions"][-1]
    assert entry["secondsToRecover"] == 1100.0
    assert entry["restartTime"] == format_time(T0 + 1100)
    assert job.condition("Running")["message"] == "attempt 2: 2/2 replicas running"


def test_restart_waits_for_a_preempted_replica_to_write_its_final_checkpoint() -> None:
    job = Job(make_spec(grace=30.0)).started()
    still_running = preempted(1, phase="running")
    # The backoff alone would end at T0 + 110; the grace period ends at T0 + 130.
    assert job.see(running(0), still_running, at=T0 + 100).actions == (
        Wait(T0 + 130, "CommittingFinalCheckpoint"),
    )
    assert job.see(running(0), still_running, at=T0 + 110).actions == (
        Wait(T0 + 130, "CommittingFinalCheckpoint"),
    )
    # Gone within its grace period: no need to wait longer.
    result = job.see(running(0), preempted(1, phase="missing"), at=T0 + 115)
    assert [type(a) for a in result.actions] == [RestartGroup]


def test_once_rank_0_recorded_the_notice_honoured_the_restart_does_not_wait_for_the_pod() -> None:
    """The kubelet reports the reclaimed pod gone a second or so after its workers exited."""
    job = Job(make_spec(grace=30.0)).started()
    still_running = preempted(1, phase="running")
    assert job.see(running(0), still_running, at=T0 + 100).actions == (
        Wait(T0 + 130, "CommittingFinalCheckpoint"),
    )
    # The mark of an older attempt says nothing of this one's final checkpoint.
    job.status["noticeHonoured"] = {"attempt": 0, "step": 40, "time": format_time(T0 + 50)}
    assert job.see(running(0), still_running, at=T0 + 101).actions == (
        Wait(T0 + 130, "CommittingFinalCheckpoint"),
    )
    # Rank 0 wrote it after the group's final checkpoint was recorded: restart at once.
    job.status["noticeHonoured"] = {"attempt": 1, "step": 90, "time": format_time(T0 + 101)}
    result = job.see(running(0), still_running, at=T0 + 102)
    assert [type(a) for a in result.actions] == [RestartGroup]
    assert job.attempt == 2 and job.status["preemptions"] == 1


def test_a_running_replacement_of_a_lost_pod_does_not_hold_the_restart() -> None:
    # A force-deleted pod (grace 0) is replaced by the StatefulSet at once; the new pod
    # runs, but it never got the notice: there is no final checkpoint to wait for.
    job = Job(make_spec(grace=30.0)).started()
    replacement = dataclasses.replace(
        preempted(1, phase="running", reason="PodDeleted"), replaced=True
    )
    result = job.see(running(0), replacement, at=T0 + 100)
    assert not any(
        isinstance(a, Wait) and a.reason == "CommittingFinalCheckpoint" for a in result.actions
    )
    assert [type(a) for a in result.actions] == [RestartGroup]


def test_a_vanished_replica_takes_the_reason_its_replacement_carries() -> None:
    # A pass may only see the replica missing; the StatefulSet's replacement then carries
    # what the lost pod said before it went (the observer's evidence).
    job = Job(make_spec(grace=30.0)).started()
    job.see(running(0), ReplicaObservation(1, 1, phase="missing"), at=T0 + 100)
    assert job.status["interruptions"][-1]["reason"] == "Vanished"
    said = dataclasses.replace(
        preempted(1, phase="running", reason="TerminationByKubelet"), replaced=True
    )
    job.see(running(0), said, at=T0 + 101)
    entry = job.status["interruptions"][-1]
    assert (entry["kind"], entry["reason"]) == ("preemption", "TerminationByKubelet")
    assert (job.status["preemptions"], job.status["failures"]) == (1, 0)


def test_a_vanished_replica_takes_the_reason_learnt_after_the_warm_restart_went_out() -> None:
    # The pass that saw replica 1 missing restarted at once; what the lost pod said comes a
    # moment later (the observer reports it as a missing replica of attempt 1).
    job = Job(make_spec(grace=30.0, recovery="warm")).started()
    result = job.see(running(0), ReplicaObservation(1, 1, phase="missing"), at=T0 + 100)
    assert [type(a) for a in result.actions] == [RestartGroup]
    assert (job.state, job.attempt) == ("Restarting", 2)
    job.see(running(0, 2), pending(1, 2), preempted(1, 1, phase="missing"), at=T0 + 101)
    entry = job.status["interruptions"][-1]
    assert (entry["kind"], entry["reason"], entry["attempt"]) == (
        "preemption",
        "TerminationByKubelet",
        1,
    )
    assert (job.status["preemptions"], job.status["failures"]) == (1, 0)
    job.see(running(0, 2), running(1, 2), preempted(1, 1, phase="missing"), at=T0 + 103)
    assert (job.state, job.attempt, job.status["preemptions"]) == ("Running", 2, 1)


def test_draining_is_capped_by_the_grace_period() -> None:
    job = Job(make_spec(grace=30.0)).started()
    still_running = preempted(1, phase="running")
    job.see(running(0), still_running, at=T0 + 100)
    result = job.see(running(0), still_running, at=T0 + 130)
    assert [type(a) for a in result.actions] == [RestartGroup]


def test_backoff_grows_with_consecutive_interruptions() -> None:
    job = Job(make_spec(max_failures=10)).started()
    waits = []
    at = T0 + 100
    for _ in range(7):
        result = job.see(running(0, job.attempt), oom(1, job.attempt), at=at)
        (wait,) = result.actions
        assert isinstance(wait, Wait)
        waits.append(wait.until - at)
        job.see(running(0, job.attempt), oom(1, job.attempt), at=wait.until)
        job.restarted(at=wait.until + 1)
        at = wait.until + 60
    assert waits == [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]


def test_backoff_resets_after_a_healthy_run() -> None:
    job = Job(make_spec(max_failures=10)).started()
    job.interrupted(running(0), oom(1), at=T0 + 100).restarted(at=T0 + 1200)
    job.interrupted(running(0, 2), oom(1, 2), at=T0 + 1300).restarted(at=T0 + 2400)
    # A healthy run of more than ten minutes since the last recovery:
    result = job.see(running(0, 3), oom(1, 3), at=T0 + 2400 + 601)
    assert result.actions == (Wait(T0 + 2400 + 611, "Backoff"),)


def test_jitter_shortens_the_backoff_by_the_drawn_share() -> None:
    spec = make_spec(backoff=Backoff(initial_seconds=100.0, max_seconds=300.0, jitter=0.5))
    job = Job(spec, jitter=0.5).started()
    assert job.see(running(0), oom(1), at=T0 + 100).actions == (Wait(T0 + 175, "Backoff"),)


def test_jitter_can_be_drawn_from_a_random_generator() -> None:
    spec = make_spec(backoff=Backoff(initial_seconds=100.0, max_seconds=300.0, jitter=0.5))
    draw = random.Random(7).random()
    job = Job(spec, jitter=random.Random(7)).started()
    (wait,) = job.see(running(0), oom(1), at=T0 + 100).actions
    assert isinstance(wait, Wait)
    assert wait.until == pytest.approx(T0 + 100 + 100 * (1 - 0.5 * draw), abs=1e-3)


# -- budgets ----------------------------------------------------------------------------


def test_failures_within_max_failures_restart() -> None:
    job = Job(make_spec(max_failures=2)).started()
    job.interrupted(running(0), oom(1), at=T0 + 100).restarted(at=T0 + 1200)
    job.interrupted(running(0, 2), oom(1, 2), at=T0 + 5000).restarted(at=T0 + 6200)
    assert (job.state, job.status["failures"]) == ("Running", 2)


def test_failed_when_failures_exceed_max_failures() -> None:
    job = Job(make_spec(max_failures=1)).started()
    job.interrupted(running(0), oom(1), at=T0 + 100).restarted(at=T0 + 1200)
    job.interrupted(running(0, 2), crashed(1, 2), at=T0 + 5000)
    assert (job.state, job.status["failures"], job.attempt) == ("Failed", 2, 2)
    (fail,) = job.actions
    assert isinstance(fail, Fail) and fail.reason == "MaxFailuresExceeded"
    assert job.condition("Failed")["status"] == "True"
    assert job.condition("Failed")["message"] == fail.message
    assert job.condition("Running")["reason"] == "MaxFailuresExceeded"
    assert job.status["completionTime"] == format_time(T0 + 6000)


def test_the_backoff_message_says_the_job_is_about_to_fail() -> None:
    job = Job(make_spec(max_failures=0)).started()
    job.see(running(0), oom(1), at=T0 + 100)
    assert "failing (MaxFailuresExceeded)" in job.condition("Running")["message"]


def test_failed_when_preemptions_exceed_max_preemptions() -> None:
    job = Job(make_spec(max_preemptions=1)).started()
    job.interrupted(running(0), preempted(1), at=T0 + 100).restarted(at=T0 + 1200)
    assert job.state == "Running"
    job.see(running(0, 2), preempted(1, 2), at=T0 + 5000)
    assert (job.state, job.status["preemptions"]) == ("Failed", 2)
    assert job.condition("Failed")["reason"] == "MaxPreemptionsExceeded"


def test_circuit_breaker_trips_after_n_failures_within_window() -> None:
    breaker = CircuitBreaker(failures=3, window_seconds=3600.0)
    job = Job(make_spec(max_failures=100, circuit_breaker=breaker)).started()
    at = T0 + 100
    for attempt in (1, 2, 3):
        job.interrupted(running(0, attempt), oom(1, attempt), at=at)
        if job.state == "Failed":
            break
        job.restarted(at=at + 1001)
        at += 1100
    assert (job.state, job.status["failures"]) == ("Failed", 3)
    assert job.condition("Failed")["reason"] == "CircuitBreakerTripped"
    assert "3 failures within 3600s" in job.condition("Failed")["message"]


def test_circuit_breaker_does_not_trip_when_failures_are_spread_out() -> None:
    breaker = CircuitBreaker(failures=2, window_seconds=600.0)
    job = Job(make_spec(max_failures=100, circuit_breaker=breaker)).started()
    job.interrupted(running(0), oom(1), at=T0 + 100).restarted(at=T0 + 1200)
    job.interrupted(running(0, 2), oom(1, 2), at=T0 + 5000).restarted(at=T0 + 6200)
    assert job.state == "Running"


def test_preemptions_do_not_trip_the_circuit_breaker() -> None:
    breaker = CircuitBreaker(failures=2, window_seconds=36000.0)
    job = Job(make_spec(circuit_breaker=breaker)).started()
    job.interrupted(running(0), preempted(1), at=T0 + 100).restarted(at=T0 + 1200)
    job.interrupted(running(0, 2), preempted(1, 2), at=T0 + 1300).restarted(at=T0 + 2400)
    assert job.state == "Running"


# -- hangs ------------------------------------------------------------------------------


def test_hang_is_a_failure_when_no_progress_within_the_deadline() -> None:
    job = Job(make_spec(progress_deadline_seconds=600.0)).started(at=T0)
    job.see(*job.group(1), at=T0 + 300, progress=T0 + 200)
    assert job.state == "Running"
    job.see(*job.group(1), at=T0 + 801, progress=T0 + 200)
    assert (job.state, job.status["failures"]) == ("Restarting", 1)
    assert job.status["interruptions"][-1]["reason"] == "ProgressDeadlineExceeded"


def test_a_running_job_wakes_the_caller_at_its_progress_deadline() -> None:
    job = Job(make_spec(progress_deadline_seconds=600.0)).started(at=T0)
    result = job.see(*job.group(1), at=T0 + 300, progress=T0 + 250)
    assert result.actions == (Wait(T0 + 850, "ProgressDeadline"),)


def test_hang_is_measured_from_the_attempt_start_not_old_progress() -> None:
    job = Job(make_spec(progress_deadline_seconds=600.0)).started(at=T0)
    job.interrupted(running(0), preempted(1), at=T0 + 100).restarted(at=T0 + 2000)
    job.see(*job.group(2), at=T0 + 2500, progress=T0 + 90)
    assert (job.state, job.status["failures"]) == ("Running", 0)


# The attempt of `Job().started(at=T0)` starts (every replica running) at T0 + 1.
STARTED = T0 + 1
HANG_CASES = [
    # (id, policy, seconds after the start, last progress (None: none yet), reason or None)
    ("start-up slower than the deadline", {"progress_deadline_seconds": 10.0}, 300, None, None),
    (
        "progress of an older attempt is still start-up",
        {"progress_deadline_seconds": 10.0},
        300,
        T0 - 50,
        None,
    ),
    ("training, reported in time", {"progress_deadline_seconds": 10.0}, 29, T0 + 20, None),
    (
        "training, silent past the deadline",
        {"progress_deadline_seconds": 10.0},
        31,
        T0 + 20,
        "ProgressDeadlineExceeded",
    ),
    (
        "start-up within the default allowance (600 s)",
        {"progress_deadline_seconds": 10.0},
        600,
        None,
        None,
    ),
    (
        "start-up past the default allowance",
        {"progress_deadline_seconds": 10.0},
        601,
        None,
        "StartupDeadlineExceeded",
    ),
    (
        "a long deadline stretches the allowance to 3 deadlines",
        {"progress_deadline_seconds": 300.0},
        899,
        None,
        None,
    ),
    (
        "start-up past the allowance set",
        {"progress_deadline_seconds": 10.0, "startup_deadline_seconds": 30.0},
        31,
        None,
        "StartupDeadlineExceeded",
    ),
    (
        "a start-up allowance alone leaves training unwatched",
        {"startup_deadline_seconds": 30.0},
        10_000,
        T0 + 5,
        None,
    ),
    (
        "a start-up allowance alone still catches a hung start-up",
        {"startup_deadline_seconds": 30.0},
        31,
        None,
        "StartupDeadlineExceeded",
    ),
    ("no deadline at all", {}, 1_000_000, None, None),
]


@pytest.mark.parametrize(
    ("policy", "after", "progress", "reason"),
    [case[1:] for case in HANG_CASES],
    ids=[case[0] for case in HANG_CASES],
)
def test_the_progress_deadline_applies_after_the_first_report_and_start_up_has_its_own(
    policy: dict[str, float], after: float, progress: float | None, reason: str | None
) -> None:
    job = Job(make_spec(**policy)).started(at=T0)
    job.see(*job.group(1), at=STARTED + after, progress=progress)
    if reason is None:
        assert (job.state, job.status["failures"]) == ("Running", 0), job.status
    else:
        assert (job.state, job.status["failures"]) == ("Restarting", 1)
        assert job.status["interruptions"][-1]["kind"] == "hang"
        assert job.status["interruptions"][-1]["reason"] == reason


def test_a_starting_attempt_wakes_the_caller_when_its_start_up_allowance_ends() -> None:
    job = Job(make_spec(progress_deadline_seconds=10.0)).started(at=T0)
    result = job.see(*job.group(1), at=STARTED + 5)
    assert result.actions == (Wait(STARTED + 600, "StartupDeadline"),)
    result = job.see(*job.group(1), at=STARTED + 7, progress=STARTED + 6)
    assert result.actions == (Wait(STARTED + 16, "ProgressDeadline"),)


def test_no_hang_is_detected_while_pending() -> None:
    job = Job(make_spec(progress_deadline_seconds=60.0))
    job.see(at=T0)
    job.see(pending(0, waiting_reason="Unschedulable"), pending(1), at=T0 + 10_000, progress=T0)
    assert (job.state, job.status["failures"]) == ("Pending", 0)


# -- blockers ---------------------------------------------------------------------------


def test_unschedulable_is_a_condition_not_a_restart() -> None:
    job = Job()
    job.see(at=T0)
    result = job.see(
        running(0),
        pending(1, waiting_reason="Unschedulable", message="0/3 nodes are available"),
        at=T0 + 600,
    )
    assert result.actions == ()
    assert (job.state, job.attempt, job.status["failures"]) == ("Pending", 1, 0)
    ready = job.condition("PodsReady")
    assert (ready["status"], ready["reason"]) == ("False", "Unschedulable")
    assert ready["message"] == "replica 1: Unschedulable: 0/3 nodes are available"


def test_image_pull_error_is_a_condition_not_a_restart() -> None:
    job = restarting()
    result = job.see(pending(0, 2, waiting_reason="ErrImagePull"), pending(1, 2), at=T0 + 1200)
    assert result.actions == ()
    assert job.attempt == 2
    assert job.condition("PodsReady")["reason"] == "ImagePullBackOff"


# -- suspend ----------------------------------------------------------------------------


def test_suspend_removes_the_group_and_is_not_a_failure() -> None:
    job = Job().started()
    result = job.see(*job.group(1), at=T0 + 50, suspended=True)
    assert result.actions == (Suspend(),)
    assert (job.status["failures"], job.status["preemptions"]) == (0, 0)
    assert job.condition("Suspended")["status"] == "True"
    assert job.condition("Running")["reason"] == "Suspended"


def test_resume_after_suspend_starts_a_new_attempt_from_the_latest_checkpoint() -> None:
    job = suspended()
    job.status = with_checkpoint(job.status, step=50)
    result = job.see(at=T0 + 60)
    assert result.actions == (StartGroup(2, f"{STORAGE}/default/job/ckpt-000050"),)
    assert job.condition("Suspended")["status"] == "False"
    assert (job.status["failures"], job.status["preemptions"]) == (0, 0)


def test_suspend_during_backoff_cancels_the_restart() -> None:
    job = backing_off()
    job.see(running(0), oom(1), at=T0 + 105, suspended=True)
    assert "restartNotBefore" not in job.status
    assert job.see(at=T0 + 200).actions == (StartGroup(2, None),)
    assert job.status["failures"] == 1


def test_a_failure_before_a_suspend_still_counts_on_resume() -> None:
    job = Job(make_spec(max_failures=0)).started()
    job.see(running(0), oom(1), at=T0 + 100)
    job.see(at=T0 + 101, suspended=True)
    assert job.state == "Suspended"
    job.see(at=T0 + 5000)
    assert (job.state, job.attempt) == ("Failed", 1)
    assert job.condition("Failed")["reason"] == "MaxFailuresExceeded"


def test_a_job_created_suspended_starts_nothing() -> None:
    job = Job()
    assert job.see(at=T0, suspended=True).actions == (Suspend(),)
    assert job.attempt == 0
    assert "startTime" not in job.status
    assert job.see(at=T0 + 5).actions == (StartGroup(1, None),)


# -- finishing --------------------------------------------------------------------------


def test_completion_succeeds_the_job() -> None:
    job = Job().started()
    result = job.see(*job.group(1), at=T0 + 50, completed=True)
    assert result.actions == (Succeed(),)
    assert job.status["completionTime"] == format_time(T0 + 50)
    assert job.condition("Succeeded")["status"] == "True"
    assert job.condition("Running")["status"] == "False"


def test_completion_wins_over_a_failure_seen_at_the_same_time() -> None:
    job = Job().started()
    job.see(running(0), crashed(1), at=T0 + 50, completed=True)
    assert (job.state, job.status["failures"]) == ("Succeeded", 0)


def test_finished_jobs_stay_finished() -> None:
    job = succeeded()
    job.see(crashed(0), preempted(1), at=T0 + 70, suspended=True)
    assert (job.state, job.status["failures"], job.status["preemptions"]) == ("Succeeded", 0, 0)
    assert job.status["completionTime"] == format_time(T0 + 50)


def test_ttl_deletes_the_job_after_it_finished() -> None:
    job = Job(make_spec(ttl=100.0)).started()
    job.see(*job.group(1), at=T0 + 50, completed=True)
    assert job.actions == (Succeed(), Wait(T0 + 150, "TTLAfterFinished"))
    assert job.see(at=T0 + 150).actions == (Succeed(), DeleteJob())


def test_ttl_applies_to_failed_jobs() -> None:
    job = Job(make_spec(ttl=0.0, max_failures=0)).started()
    job.interrupted(running(0), oom(1), at=T0 + 100)
    assert job.state == "Failed"
    assert DeleteJob() in job.actions


# -- status hygiene ---------------------------------------------------------------------


def test_running_condition_keeps_its_transition_time_when_only_the_reason_changes() -> None:
    job = Job()
    job.see(at=T0)
    job.see(crashed(0), pending(1), at=T0 + 30)
    condition = job.condition("Running")
    assert (condition["status"], condition["reason"]) == ("False", "Error")
    assert condition["lastTransitionTime"] == format_time(T0)


def test_observed_generation_follows_the_spec() -> None:
    job = Job().started()
    job.see(*job.group(1), at=T0 + 5, generation=7)
    assert job.status["observedGeneration"] == 7
    assert {c["observedGeneration"] for c in job.status["conditions"]} == {7}


def test_plan_changes_only_the_fields_it_owns() -> None:
    runtime_fields = {
        "latestCheckpoint": {"uri": f"{STORAGE}/x/ckpt-000003", "step": 3},
        "checkpoints": [{"uri": f"{STORAGE}/x/ckpt-000003", "step": 3}],
        "bestCheckpoints": [],
        "lastMetrics": {"step": 4, "loss": 0.5},
        "completion": None,
    }
    corrupt = {
        "type": "CheckpointCorrupt",
        "status": "True",
        "reason": "Sha256Mismatch",
        "message": "",
        "lastTransitionTime": format_time(T0),
    }
    job = Job(status={**runtime_fields, "conditions": [corrupt]})
    job.see(at=T0)
    job.see(running(0), oom(1), at=T0 + 1)
    job.see(running(0), oom(1), at=T0 + 500)
    for name, value in runtime_fields.items():
        assert job.status[name] == value
    assert job.condition("CheckpointCorrupt") == corrupt
    assert set(job.status) - set(runtime_fields) <= set(OWNED_FIELDS)


def test_plan_does_not_modify_its_input() -> None:
    status = running_job().status
    snapshot = {**status, "conditions": [dict(c) for c in status["conditions"]]}
    plan(make_spec(), status, Observation(T0 + 100, (running(0), oom(1))), 0.0)
    assert status == snapshot


def test_plan_is_idempotent() -> None:
    job = Job().started()
    job.see(running(0), oom(1), at=T0 + 100)
    first = job.see(running(0), oom(1), at=T0 + 110)
    assert first.actions == (RestartGroup(2, None, "OOMKilled", T0 + 110),)
    for _ in range(3):
        again = job.see(running(0), oom(1), at=T0 + 110)
        assert again.status == first.status
        assert again.actions == first.actions
    assert (job.attempt, job.status["failures"]) == (2, 1)


def honoured_notice(index: int, attempt: int = 1) -> ReplicaObservation:
    return ReplicaObservation(index, attempt, phase="failed", exit_code=75, reason="Error")


def test_restart_waits_while_rank_0_commits_after_another_replica_honoured_the_notice() -> None:
    # Replica 1 got the notice and exited 75 once its shard was written; replica 0 (rank 0)
    # still writes the manifest and the status record. Restarting now would fence it out.
    job = Job(make_spec(grace=30.0)).started()
    assert job.see(running(0), honoured_notice(1), at=T0 + 100).actions == (
        Wait(T0 + 130, "CommittingFinalCheckpoint"),
    )
    result = job.see(honoured_notice(0), honoured_notice(1), at=T0 + 112)
    assert [type(a) for a in result.actions] == [RestartGroup]
    assert job.status["preemptions"] == 1 and job.status["failures"] == 0


def test_a_replica_lost_without_notice_does_not_hold_the_restart() -> None:
    job = Job(make_spec(grace=30.0)).started()
    killed = preempted(1, phase="missing", reason="Vanished")
    result = job.see(running(0), killed, at=T0 + 100)
    assert not any(
        isinstance(a, Wait) and a.reason == "CommittingFinalCheckpoint" for a in result.actions
    )
