"""Backoff: exponential in consecutive interruptions, capped, with jitter taken off."""

from __future__ import annotations

from typing import Any

import pytest

from spotrun.lifecycle.backoff import RESET_AFTER_SECONDS, consecutive, delay
from spotrun.lifecycle.spec import Backoff
from spotrun.lifecycle.times import format_time

NO_JITTER = Backoff(initial_seconds=10.0, max_seconds=300.0, jitter=0.0)


@pytest.mark.parametrize(
    ("n", "seconds"),
    [(1, 10.0), (2, 20.0), (3, 40.0), (5, 160.0), (6, 300.0), (50, 300.0), (10_000, 300.0)],
)
def test_delay_doubles_up_to_the_maximum(n: int, seconds: float) -> None:
    assert delay(NO_JITTER, n, 0.0) == seconds


@pytest.mark.parametrize(("draw", "seconds"), [(0.0, 100.0), (0.5, 75.0), (0.999, 50.05)])
def test_jitter_takes_up_to_its_share_off(draw: float, seconds: float) -> None:
    backoff = Backoff(initial_seconds=100.0, max_seconds=1000.0, jitter=0.5)
    assert delay(backoff, 1, draw) == pytest.approx(seconds)


def test_jittered_delay_never_exceeds_the_maximum() -> None:
    backoff = Backoff(initial_seconds=10.0, max_seconds=30.0, jitter=1.0)
    assert all(delay(backoff, n, d / 10) <= 30.0 for n in range(1, 10) for d in range(10))


@pytest.mark.parametrize(("n", "draw"), [(0, 0.0), (1, 1.0), (1, -0.1)])
def test_delay_rejects_bad_arguments(n: int, draw: float) -> None:
    with pytest.raises(ValueError):
        delay(NO_JITTER, n, draw)


def entry(at: float, recovered_after: float | None = None, kind: str = "failure") -> dict[str, Any]:
    e: dict[str, Any] = {"time": format_time(at), "kind": kind}
    if recovered_after is not None:
        e["secondsToRecover"] = recovered_after
    return e


CONSECUTIVE: list[tuple[str, list[dict[str, Any]], int]] = [
    ("the first interruption", [entry(0.0)], 1),
    ("one shortly after a recovery", [entry(0.0, 30.0), entry(100.0)], 2),
    ("one after a long healthy run", [entry(0.0, 30.0), entry(30.0 + RESET_AFTER_SECONDS)], 1),
    ("one while still recovering", [entry(0.0), entry(5000.0)], 2),
    (
        "the count stops at the last healthy run",
        [entry(0.0, 10.0), entry(2000.0, 10.0), entry(2100.0, 10.0), entry(2200.0)],
        3,
    ),
    # Preemptions are the capacity going, not a crash loop: they neither count nor break a run.
    (
        "preemptions between failures are skipped",
        [entry(0.0, 10.0), entry(50.0, 5.0, "preemption"), entry(100.0)],
        2,
    ),
    ("preemptions alone count for nothing", [entry(0.0, 5.0, "preemption")] * 3, 0),
]


@pytest.mark.parametrize(
    ("ledger", "count"), [c[1:] for c in CONSECUTIVE], ids=[c[0] for c in CONSECUTIVE]
)
def test_consecutive_interruptions(ledger: list[dict[str, Any]], count: int) -> None:
    assert consecutive(ledger) == count
