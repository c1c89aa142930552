"""Budgets: maxFailures, maxPreemptions (-1 unlimited) and the circuit breaker."""

from __future__ import annotations

import pytest

from spotrun.lifecycle.budget import exhausted
from spotrun.lifecycle.spec import CircuitBreaker, FailurePolicy

BREAKER = FailurePolicy(max_failures=100, circuit_breaker=CircuitBreaker(3, 600.0))

# (name, policy, failures, preemptions, failure times, expected reason)
CASES: list[tuple[str, FailurePolicy, int, int, list[float], str | None]] = [
    ("within the failure budget", FailurePolicy(max_failures=3), 3, 0, [], None),
    ("one failure past the budget", FailurePolicy(max_failures=3), 4, 0, [], "MaxFailuresExceeded"),
    ("zero failures allowed", FailurePolicy(max_failures=0), 1, 0, [], "MaxFailuresExceeded"),
    ("preemptions unlimited by default", FailurePolicy(), 0, 10_000, [], None),
    ("within the preemption budget", FailurePolicy(max_preemptions=2), 0, 2, [], None),
    (
        "past the preemption budget",
        FailurePolicy(max_preemptions=2),
        0,
        3,
        [],
        "MaxPreemptionsExceeded",
    ),
    ("no preemption allowed", FailurePolicy(max_preemptions=0), 0, 1, [], "MaxPreemptionsExceeded"),
    ("preemptions never spend the failure budget", FailurePolicy(max_failures=0), 0, 50, [], None),
    ("breaker: fewer than n in the window", BREAKER, 2, 0, [0.0, 100.0], None),
    ("breaker: n within the window", BREAKER, 3, 0, [0.0, 300.0, 600.0], "CircuitBreakerTripped"),
    ("breaker: n spread wider than the window", BREAKER, 3, 0, [0.0, 300.0, 600.5], None),
    ("breaker: old failures fall out", BREAKER, 5, 0, [0.0, 1.0, 2000.0, 2001.0], None),
    (
        "breaker trips before the total budget",
        FailurePolicy(max_failures=3, circuit_breaker=CircuitBreaker(2, 60.0)),
        2,
        0,
        [0.0, 30.0],
        "CircuitBreakerTripped",
    ),
]


@pytest.mark.parametrize(
    ("policy", "failures", "preemptions", "times", "reason"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_exhausted(
    policy: FailurePolicy, failures: int, preemptions: int, times: list[float], reason: str | None
) -> None:
    verdict = exhausted(policy, failures=failures, preemptions=preemptions, failure_times=times)
    assert (verdict.reason if verdict else None) == reason


def test_circuit_breaker_message_says_what_tripped_and_what_to_do() -> None:
    verdict = exhausted(BREAKER, failures=3, preemptions=0, failure_times=[0.0, 1.0, 2.0])
    assert verdict is not None
    assert verdict.message.startswith(
        "3 failures within 600s tripped the circuit breaker "
        "(failurePolicy.circuitBreaker: 3 failures within 600s)"
    )
    assert "status.interruptions" in verdict.message


def test_failure_budget_message_names_the_setting() -> None:
    verdict = exhausted(FailurePolicy(max_failures=3), failures=4, preemptions=0, failure_times=[])
    assert verdict is not None
    assert "4 application failures, more than failurePolicy.maxFailures=3" in verdict.message
