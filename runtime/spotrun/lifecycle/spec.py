"""The parts of a TrainJob's spec the restart policy reads, with the CRD's defaults.

The policy takes typed values rather than the raw spec so that its decisions do not
depend on which caller filled in defaults; `JobSpec.from_spec` applies the same defaults
as the CRD schema, so an object read from the cluster and a local file agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Recovery = Literal["warm", "cold"]
Batch = Literal["global", "perReplica"]

DEFAULT_MAX_FAILURES = 3
UNLIMITED = -1
DEFAULT_INITIAL_BACKOFF = 10.0
DEFAULT_MAX_BACKOFF = 300.0
DEFAULT_JITTER = 0.2
# Kubernetes' default terminationGracePeriodSeconds: how long a preempted pod may take to
# write its final checkpoint before the group is restarted anyway.
DEFAULT_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Backoff:
    """`failurePolicy.backoff`: delay before a group restart, doubling per interruption."""

    initial_seconds: float = DEFAULT_INITIAL_BACKOFF
    max_seconds: float = DEFAULT_MAX_BACKOFF
    jitter: float = DEFAULT_JITTER


@dataclass(frozen=True)
class CircuitBreaker:
    """`failurePolicy.circuitBreaker`: `failures` failures within `window_seconds` fail the job."""

    failures: int
    window_seconds: float


@dataclass(frozen=True)
class FailurePolicy:
    """`spec.failurePolicy`. `max_preemptions` of -1 means unlimited."""

    max_failures: int = DEFAULT_MAX_FAILURES
    max_preemptions: int = UNLIMITED
    backoff: Backoff = field(default_factory=Backoff)
    circuit_breaker: CircuitBreaker | None = None
    progress_deadline_seconds: float | None = None
    startup_deadline_seconds: float | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> FailurePolicy:
        backoff = spec.get("backoff") or {}
        breaker = spec.get("circuitBreaker")
        deadline = spec.get("progressDeadlineSeconds")
        startup = spec.get("startupDeadlineSeconds")
        return cls(
            max_failures=int(spec.get("maxFailures", DEFAULT_MAX_FAILURES)),
            max_preemptions=int(spec.get("maxPreemptions", UNLIMITED)),
            backoff=Backoff(
                initial_seconds=float(backoff.get("initialSeconds", DEFAULT_INITIAL_BACKOFF)),
                max_seconds=float(backoff.get("maxSeconds", DEFAULT_MAX_BACKOFF)),
                jitter=float(backoff.get("jitter", DEFAULT_JITTER)),
            ),
            circuit_breaker=(
                CircuitBreaker(int(breaker["failures"]), float(breaker["windowSeconds"]))
                if breaker
                else None
            ),
            progress_deadline_seconds=None if deadline is None else float(deadline),
            startup_deadline_seconds=None if startup is None else float(startup),
        )


DEFAULT_ELASTIC_WAIT = 60.0


@dataclass(frozen=True)
class Elastic:
    """`spec.elastic`: the group may run below `spec.replicas`, down to `min_replicas`.

    A replacement that cannot be scheduled for `wait_seconds` is given up: the survivors
    re-form without it. When it runs again the group grows back at a checkpoint boundary.
    `batch` says what a resize keeps: the global batch (`global`: each rank's share grows
    as the group shrinks) or each replica's batch (`perReplica`).
    """

    min_replicas: int = 1
    wait_seconds: float = DEFAULT_ELASTIC_WAIT
    batch: Batch = "global"

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Elastic:
        return cls(
            min_replicas=int(spec.get("minReplicas", 1)),
            wait_seconds=float(spec.get("waitSeconds", DEFAULT_ELASTIC_WAIT)),
            batch="perReplica" if str(spec.get("batch", "global")) == "perReplica" else "global",
        )


@dataclass(frozen=True)
class JobSpec:
    """What the policy needs of `spec`: group size, resume point, budgets, TTL."""

    replicas: int = 1
    resume_from: str | None = None
    failure_policy: FailurePolicy = field(default_factory=FailurePolicy)
    ttl_seconds_after_finished: float | None = None
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    # warm: a preemption keeps the surviving replicas (their processes, torch, the state in
    # memory) and replaces only the lost ones; cold: every preemption restarts the group.
    recovery: Recovery = "warm"
    # None: the group always runs at `replicas` (a lost replica is waited for).
    elastic: Elastic | None = None
    # Warm spares (spec.spares): pods beyond `replicas` whose workers wait outside the group;
    # a warm recovery puts a running one in a lost member's place. The pool of replica
    # indices (pod ordinals) is then 0 to replicas + spares - 1.
    spares: int = 0

    @property
    def pool(self) -> int:
        """How many pods the job runs: the group's target and its spares."""
        return self.replicas + self.spares

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> JobSpec:
        """Reads a TrainJob `spec` (camelCase, as in the CRD), applying the CRD's defaults."""
        ttl = spec.get("ttlSecondsAfterFinished")
        pod = (spec.get("template") or {}).get("spec") or {}
        grace = pod.get("terminationGracePeriodSeconds")
        return cls(
            replicas=int(spec.get("replicas", 1)),
            resume_from=spec.get("resumeFrom") or None,
            failure_policy=FailurePolicy.from_spec(spec.get("failurePolicy") or {}),
            ttl_seconds_after_finished=None if ttl is None else float(ttl),
            grace_seconds=DEFAULT_GRACE_SECONDS if grace is None else float(grace),
            recovery="cold" if str(spec.get("recovery", "Warm")).lower() == "cold" else "warm",
            elastic=None if spec.get("elastic") is None else Elastic.from_spec(spec["elastic"]),
            spares=int(spec.get("spares") or 0),
        )
