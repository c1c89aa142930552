"""Decides when a job has failed for good: failure and preemption budgets, circuit breaker.

Preemptions and failures are counted apart because only failures are the training code's
fault. The circuit breaker catches what a total budget cannot: a job with a generous
`maxFailures` (it runs for weeks) that starts failing in a tight loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spotrun.lifecycle.spec import UNLIMITED, FailurePolicy

MAX_FAILURES_EXCEEDED = "MaxFailuresExceeded"
MAX_PREEMPTIONS_EXCEEDED = "MaxPreemptionsExceeded"
CIRCUIT_BREAKER_TRIPPED = "CircuitBreakerTripped"


@dataclass(frozen=True)
class Exhausted:
    """A budget is spent: the job fails with this `reason` and `message`."""

    reason: str
    message: str


def exhausted(
    policy: FailurePolicy,
    *,
    failures: int,
    preemptions: int,
    failure_times: Sequence[float],
) -> Exhausted | None:
    """Which budget, if any, the counts have spent.

    `failures` and `preemptions` are the job's totals so far, the newest interruption
    included. `failure_times` are the times of recent failures (hangs included); the
    circuit breaker counts those within `windowSeconds` of the newest one, so the verdict
    does not depend on how long the backoff before the restart lasted.
    """
    breaker = policy.circuit_breaker
    if breaker is not None and failure_times:
        newest = max(failure_times)
        recent = sum(1 for t in failure_times if newest - t <= breaker.window_seconds)
        if recent >= breaker.failures:
            return Exhausted(
                CIRCUIT_BREAKER_TRIPPED,
                f"{recent} failures within {breaker.window_seconds:g}s tripped the circuit "
                f"breaker (failurePolicy.circuitBreaker: {breaker.failures} failures within "
                f"{breaker.window_seconds:g}s); the training code fails repeatedly: see "
                "status.interruptions for the reasons, fix it and create the job again",
            )
    if failures > policy.max_failures:
        return Exhausted(
            MAX_FAILURES_EXCEEDED,
            f"{failures} application failures, more than failurePolicy.maxFailures="
            f"{policy.max_failures}; see status.interruptions for the reasons, fix the "
            "cause and create the job again (it resumes from its latest checkpoint with "
            "spec.resumeFrom), or raise maxFailures",
        )
    if policy.max_preemptions != UNLIMITED and preemptions > policy.max_preemptions:
        return Exhausted(
            MAX_PREEMPTIONS_EXCEEDED,
            f"{preemptions} preemptions, more than failurePolicy.maxPreemptions="
            f"{policy.max_preemptions}; raise maxPreemptions (-1 means unlimited) or run on "
            "nodes that are not preemptible",
        )
    return None
