"""Local mode's observations: replica launcher exits as the lifecycle policy must read them."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from spotrun.lifecycle import (
    JobSpec,
    RestartGroup,
    Wait,
    classify,
    format_time,
    plan,
)
from spotrun.local.observe import (
    ReplicaFacts,
    observe,
    replica_observation,
)

T0 = 1_700_000_000.0
KILLED = -signal.SIGKILL


def facts(index: int, **fields: Any) -> ReplicaFacts:
    fields.setdefault("attempt", 1)
    return ReplicaFacts(index, **fields)


# (name, facts, phase, exit_code, preempted, reason)
CASES = [
    ("running launcher", facts(0), "running", None, False, None),
    ("clean exit", facts(0, returncode=0), "succeeded", 0, False, "Completed"),
    ("notice honoured", facts(0, returncode=75), "failed", 75, False, "Error"),
    ("crash", facts(0, returncode=1), "failed", 1, False, "Error"),
    (
        "killed by a signal it was not sent",
        facts(0, returncode=KILLED),
        "failed",
        137,
        False,
        "Error",
    ),
    ("injected SIGTERM, still committing", facts(0, fault="preempt"), "running", None, True, None),
    (
        "injected SIGTERM, exited 75",
        facts(0, returncode=75, fault="preempt"),
        "failed",
        75,
        True,
        "Error",
    ),
    ("injected SIGKILL", facts(0, returncode=KILLED, fault="kill"), "failed", 137, True, "Error"),
]


@pytest.mark.parametrize(
    ("name", "replica", "phase", "exit_code", "preempted", "reason"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_replica_observation(
    name: str,
    replica: ReplicaFacts,
    phase: str,
    exit_code: int | None,
    preempted: bool,
    reason: str | None,
) -> None:
    seen = replica_observation(replica)
    assert (seen.phase, seen.exit_code, seen.preempted, seen.reason) == (
        phase,
        exit_code,
        preempted,
        reason,
    )
    assert seen.ready == (phase == "running")


def test_injected_faults_name_their_kind() -> None:
    assert replica_observation(facts(0, fault="preempt")).preemption_reason == "InjectedPreemption"
    assert replica_observation(facts(0, fault="kill")).preemption_reason == "InjectedKill"


def test_a_crash_message_points_at_the_replica_log_and_names_the_signal() -> None:
    seen = replica_observation(facts(1, returncode=KILLED, log="/runs/logs/replica-1.log"))
    assert seen.message == "killed by SIGKILL; log: /runs/logs/replica-1.log"
    assert replica_observation(facts(1, returncode=0, log="x")).message is None


def test_a_replica_being_stopped_is_not_present_or_ready() -> None:
    seen = replica_observation(facts(0, stopping=True))
    assert not seen.present
    assert not seen.ready


def test_a_killed_replica_and_the_crashes_it_causes_are_one_preemption() -> None:
    # SIGKILL to replica 1: its peer's collectives fail, and replica 0 exits 1 as well.
    group = [
        replica_observation(facts(0, returncode=1)),
        replica_observation(facts(1, returncode=KILLED, fault="kill")),
    ]
    interruption = classify(group, expected=2, was_running=True, now=T0)
    assert interruption is not None
    assert (interruption.kind, interruption.reason) == ("preemption", "InjectedKill")


def test_the_peer_crash_seen_before_the_killed_replica_is_reaped_is_still_a_preemption() -> None:
    # The injected replica is flagged from the moment the signal is sent.
    group = [
        replica_observation(facts(0, returncode=1)),
        replica_observation(facts(1, fault="kill")),
    ]
    interruption = classify(group, expected=2, was_running=True, now=T0)
    assert interruption is not None and interruption.kind == "preemption"


def test_a_crash_without_an_injected_fault_is_a_failure() -> None:
    group = [replica_observation(facts(0, returncode=1)), replica_observation(facts(1))]
    interruption = classify(group, expected=2, was_running=True, now=T0)
    assert interruption is not None
    assert (interruption.kind, interruption.reason) == ("failure", "Error")


def test_observe_drops_exited_replicas_of_older_attempts_and_keeps_running_ones() -> None:
    status = {"attempt": 2}
    replicas = [
        facts(0, attempt=1, returncode=75),
        facts(1, attempt=1),
        facts(0, attempt=2, returncode=1),
    ]
    seen = observe(replicas, status, now=T0)
    assert [(r.attempt, r.index) for r in seen.replicas] == [(1, 1), (2, 0)]


def test_observe_reads_progress_and_completion_of_the_current_attempt() -> None:
    status = {
        "attempt": 3,
        "lastMetrics": {"step": 7, "time": format_time(T0 - 5)},
        "completion": {"attempt": 3, "time": format_time(T0)},
    }
    seen = observe([], status, now=T0)
    assert seen.last_progress_time == T0 - 5
    assert seen.completed
    assert seen.generation == 1


def test_a_completion_of_another_attempt_does_not_finish_the_job() -> None:
    status = {"attempt": 3, "completion": {"attempt": 2, "time": format_time(T0)}}
    assert not observe([], status, now=T0).completed


def test_a_supervisor_interrupt_is_a_suspend() -> None:
    assert observe([], {}, now=T0, suspended=True).suspended


def test_the_policy_restarts_a_group_after_an_injected_kill_and_its_collateral_crash() -> None:
    spec = JobSpec.from_spec({"replicas": 2, "failurePolicy": {"backoff": {"initialSeconds": 1}}})
    status: dict[str, Any] = {}
    decision = plan(spec, status, observe([], status, now=T0))
    status = decision.status
    group = [facts(0), facts(1)]
    status = plan(spec, status, observe(group, status, now=T0 + 1)).status
    assert status["state"] == "Running"

    crashed = [facts(0, returncode=1), facts(1, returncode=KILLED, fault="kill")]
    decision = plan(spec, status, observe(crashed, status, now=T0 + 10), jitter=0.0)
    # A preemption restarts without backoff; nobody survived, so every replica is new.
    assert decision.actions == (RestartGroup(2, None, "InjectedKill", T0 + 10),)
    status = decision.status
    assert (status["preemptions"], status["failures"]) == (1, 0)
    assert status["interruptions"][-1]["reason"] == "InjectedKill"
    assert status["group"] == {
        "attempt": 2,
        "mode": "cold",
        "replicas": 2,
        "kept": [],
        "mtbfSeconds": 10.0,
    }


def test_the_policy_keeps_the_survivor_of_an_injected_kill() -> None:
    spec = JobSpec.from_spec({"replicas": 2})
    status = running_group(spec)
    killed = [facts(0), facts(1, returncode=KILLED, fault="kill")]
    decision = plan(spec, status, observe(killed, status, now=T0 + 10), jitter=0.0)
    assert decision.actions == (RestartGroup(2, None, "InjectedKill", T0 + 10, keep=(0,)),)
    assert decision.status["group"] == {
        "attempt": 2,
        "mode": "warm",
        "replicas": 2,
        "kept": [0],
        "mtbfSeconds": 10.0,
    }
    assert decision.status["interruptions"][-1]["recovery"] == "warm"


def running_group(spec: JobSpec) -> dict[str, Any]:
    status = plan(spec, {}, observe([], {}, now=T0)).status
    return plan(spec, status, observe([facts(0), facts(1)], status, now=T0 + 1)).status


SPEC = JobSpec.from_spec(
    {
        "replicas": 2,
        "recovery": "Cold",
        "failurePolicy": {"backoff": {"initialSeconds": 1, "maxSeconds": 1, "jitter": 0}},
    }
)


def test_a_warm_recovery_does_not_wait_for_survivors_holding_the_final_checkpoint() -> None:
    spec = JobSpec.from_spec({"replicas": 2})
    status = running_group(spec)
    # Replica 1 got the notice and still writes: wait. Once it is gone, replica 0 (which
    # holds the final state in memory and stays) is kept at once.
    committing = [facts(0), facts(1, fault="preempt")]
    decision = plan(spec, status, observe(committing, status, now=T0 + 10), jitter=0.0)
    assert [a.reason for a in decision.actions if isinstance(a, Wait)] == [
        "CommittingFinalCheckpoint"
    ]
    done = [facts(0), facts(1, returncode=75, fault="preempt")]
    decision = plan(spec, decision.status, observe(done, decision.status, now=T0 + 12))
    assert decision.actions == (RestartGroup(2, None, "InjectedPreemption", T0 + 12, keep=(0,)),)


def test_the_policy_waits_while_the_group_commits_its_final_checkpoint() -> None:
    status = running_group(SPEC)
    committing_group = [facts(0), facts(1, returncode=75, fault="preempt")]
    decision = plan(SPEC, status, observe(committing_group, status, now=T0 + 10), jitter=0.0)
    assert [a.reason for a in decision.actions if isinstance(a, Wait)] == [
        "CommittingFinalCheckpoint"
    ]
    status = decision.status
    done = [facts(0, returncode=75), facts(1, returncode=75, fault="preempt")]
    decision = plan(SPEC, status, observe(done, status, now=T0 + 12), jitter=0.0)
    assert [type(a) for a in decision.actions] == [RestartGroup]


def test_a_kill_is_never_waited_for() -> None:
    # Nobody exited 75: there is no final checkpoint to wait for.
    status = running_group(SPEC)
    group = [facts(0), facts(1, returncode=KILLED, fault="kill")]
    decision = plan(SPEC, status, observe(group, status, now=T0 + 10), jitter=0.0)
    assert not any(
        isinstance(a, Wait) and a.reason == "CommittingFinalCheckpoint" for a in decision.actions
    )
