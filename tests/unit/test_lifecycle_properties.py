"""Properties of plan() over random observation sequences (hypothesis)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from spotrun.lifecycle import (
    FINISHED,
    JobSpec,
    Observation,
    ReplicaObservation,
    RestartGroup,
    plan,
)
from spotrun.lifecycle.group import GroupRecord
from spotrun.lifecycle.ledger import LEDGER_SIZE
from spotrun.lifecycle.spec import Backoff, CircuitBreaker, Elastic, FailurePolicy

T0 = 1_700_000_000.0
STATES = {"Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"}

specs = st.builds(
    lambda replicas, max_failures, max_preemptions, breaker, deadline, elastic, spares: JobSpec(
        replicas=replicas,
        elastic=None if elastic is None else Elastic(min(elastic[0], replicas), elastic[1]),
        # spec.spares, as admission allows it: two replicas or more, not with elastic.
        spares=spares if elastic is None and replicas >= 2 else 0,
        failure_policy=FailurePolicy(
            max_failures=max_failures,
            max_preemptions=max_preemptions,
            backoff=Backoff(initial_seconds=5.0, max_seconds=60.0, jitter=0.5),
            circuit_breaker=breaker,
            progress_deadline_seconds=deadline,
        ),
    ),
    replicas=st.integers(1, 3),
    max_failures=st.integers(0, 4),
    max_preemptions=st.sampled_from([-1, 0, 1, 3]),
    breaker=st.none()
    | st.builds(CircuitBreaker, st.integers(1, 5), st.sampled_from([60.0, 3600.0])),
    deadline=st.none() | st.sampled_from([30.0, 300.0]),
    elastic=st.none() | st.tuples(st.integers(1, 3), st.sampled_from([0.0, 10.0, 60.0])),
    spares=st.sampled_from([0, 0, 1, 2]),
)


@st.composite
def replica_states(draw: st.DrawFn, preemptions_only: bool = False) -> dict[str, Any]:
    """A replica's fields, except its index and attempt."""
    kinds = ["running", "pending", "missing", "preempted", "deleting"]
    if not preemptions_only:
        kinds += ["oom", "crashed", "crashloop", "unschedulable", "succeeded"]
    kind = draw(st.sampled_from(kinds))
    choices: dict[str, dict[str, Any]] = {
        "running": {"phase": "running", "ready": draw(st.booleans())},
        "pending": {"phase": "pending"},
        "missing": {"phase": "missing"},
        "preempted": {
            "phase": draw(st.sampled_from(["running", "failed", "missing", "pending"])),
            "preempted": True,
            "preemption_reason": "NodeShutdown",
        },
        "deleting": {"phase": "running", "deleting": True},
        "oom": {"phase": "running", "restarts": 1, "exit_code": 137, "reason": "OOMKilled"},
        "crashed": {"phase": "failed", "exit_code": 1, "reason": "Error"},
        "crashloop": {"phase": "running", "waiting_reason": "CrashLoopBackOff", "restarts": 3},
        "unschedulable": {"phase": "pending", "waiting_reason": "Unschedulable"},
        "succeeded": {"phase": "succeeded", "exit_code": 0},
    }
    return choices[kind]


@st.composite
def passes(draw: st.DrawFn, preemptions_only: bool = False) -> list[dict[str, Any]]:
    """A sequence of passes: time step, replica states, and the job-level flags."""
    return draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "dt": st.sampled_from([0.0, 1.0, 7.0, 30.0, 120.0, 900.0]),
                    # Up to 5 pods: a group of 3 and its spares.
                    "replicas": st.lists(replica_states(preemptions_only), min_size=0, max_size=5),
                    "attempt_offset": st.sampled_from([0, 0, 0, 0, -1, 1]),
                    "progress": st.booleans(),
                    "completed": st.just(False)
                    if preemptions_only
                    else st.integers(0, 30).map(lambda n: n == 0),
                    "suspended": st.just(False)
                    if preemptions_only
                    else st.integers(0, 15).map(lambda n: n == 0),
                }
            ),
            min_size=1,
            max_size=40,
        )
    )


def observe(step: dict[str, Any], attempt: int, now: float) -> Observation:
    replicas = tuple(
        ReplicaObservation(i, max(0, attempt + step["attempt_offset"]) or None, **fields)
        for i, fields in enumerate(step["replicas"])
    )
    return Observation(
        now,
        replicas,
        last_progress_time=now - 1.0 if step["progress"] else None,
        completed=step["completed"],
        suspended=step["suspended"],
        generation=1,
    )


@settings(max_examples=400, deadline=None)
@given(spec=specs, sequence=passes(), seed=st.integers(0, 2**32 - 1))
def test_budgets_counts_and_attempts_stay_consistent(
    spec: JobSpec, sequence: list[dict[str, Any]], seed: int
) -> None:
    status: dict[str, Any] = {}
    now = T0
    for step in sequence:
        now += step["dt"]
        before = status
        observation = observe(step, int(status.get("attempt", 0)), now)
        result = plan(spec, status, observation, jitter=(seed % 1000) / 1000)
        status = result.status

        assert status["state"] in STATES
        # failures never exceed maxFailures + 1: the failure past the budget fails the job.
        assert status["failures"] <= spec.failure_policy.max_failures + 1
        # attempt, the fencing token, never goes down; counts only grow, one per pass.
        assert status["attempt"] >= before.get("attempt", 0)
        assert status["preemptions"] >= before.get("preemptions", 0)
        grew_failures = status["failures"] - before.get("failures", 0)
        grew_preemptions = status["preemptions"] - before.get("preemptions", 0)
        assert grew_failures <= 1 and grew_preemptions <= 1
        # A preemption never spends the failure budget (a failure may turn out to be one).
        if grew_preemptions:
            assert grew_failures <= 0
        if before.get("state") in FINISHED:
            assert status["state"] == before["state"]
            assert status["completionTime"] == before["completionTime"]
        assert 0 <= status["readyReplicas"] <= spec.replicas
        assert len(status.get("interruptions", [])) <= LEDGER_SIZE
        restarts = [a for a in result.actions if isinstance(a, RestartGroup)]
        assert all(a.attempt == status["attempt"] for a in restarts)
        # The group's membership stays a group of this job: elastic never below its floor.
        record = GroupRecord.from_status(status)
        if status.get("attempt"):
            assert record is not None and record.attempt == status["attempt"]
            assert set(record.indices) <= set(range(spec.pool))
            assert len(set(record.indices)) == record.replicas
            # Kept outside the group: only waiting spares.
            assert set(record.kept) <= set(record.indices) or spec.spares
            floor = spec.elastic.min_replicas if spec.elastic else spec.replicas
            assert floor <= record.replicas <= spec.replicas
            assert status["size"] == f"{record.replicas}/{spec.replicas}"

        again = plan(spec, status, observation, jitter=0.99)
        assert again.status == status
        assert set(again.actions) <= set(result.actions)


@settings(max_examples=200, deadline=None)
@given(spec=specs, sequence=passes(preemptions_only=True))
def test_preemptions_alone_never_change_failures(
    spec: JobSpec, sequence: list[dict[str, Any]]
) -> None:
    spec = JobSpec(
        replicas=spec.replicas,
        failure_policy=FailurePolicy(
            max_failures=0,
            backoff=spec.failure_policy.backoff,
            circuit_breaker=spec.failure_policy.circuit_breaker,
        ),
    )
    status: dict[str, Any] = {}
    now = T0
    for step in sequence:
        now += step["dt"]
        status = plan(spec, status, observe(step, int(status.get("attempt", 0)), now), 0.3).status
        assert status["failures"] == 0
        assert status["state"] != "Failed"
