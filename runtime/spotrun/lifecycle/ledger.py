"""The interruption ledger: the last few interruptions with their cost, kept in status.

Each entry says when the group was interrupted, of which attempt, why (`kind`,
`reason`, `message`), when the restart went out (`restartTime`), how many steps were lost
and how long the group took to run again (`secondsToRecover`). People read it to see what
spot capacity costs them; the backoff and the circuit breaker read it to see how recent
the last interruptions were.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spotrun.lifecycle.classify import Interruption, Kind
from spotrun.lifecycle.times import format_time, parse_time

LEDGER_SIZE = 10
# An entry's replicas that their peers reported silent (spotrun.lifecycle.peers).
UNRESPONSIVE = "unresponsive"
# The shortest mean time between interruptions an estimate gives (two at once are one).
SHORTEST_MTBF_SECONDS = 1.0


def record(
    ledger: Sequence[Mapping[str, Any]],
    interruption: Interruption,
    *,
    attempt: int,
    now: float,
    step: int | None,
) -> list[dict[str, Any]]:
    """The ledger with a new entry for `interruption` of `attempt`, the last LEDGER_SIZE kept.

    `step` is the training progress reached when the interruption was seen.
    """
    entry: dict[str, Any] = {
        "time": format_time(now),
        "attempt": attempt,
        "kind": interruption.kind,
        "reason": interruption.reason,
        "message": interruption.message,
    }
    if step is not None:
        entry["step"] = step
    return [*(dict(e) for e in ledger), entry][-LEDGER_SIZE:]


def record_resize(
    ledger: Sequence[Mapping[str, Any]],
    *,
    attempt: int,
    now: float,
    reason: str,
    message: str,
    replicas: tuple[int, int],
    step: int | None,
) -> list[dict[str, Any]]:
    """The ledger with an elastic resize of `attempt`'s group: `replicas` is (from, to).

    A resize is no interruption of the budgets' kind (neither preemption nor failure): it
    is recorded for its cost, restarts at once, and is closed like the others when the
    resized group trains (`secondsToRecover`).
    """
    entry: dict[str, Any] = {
        "time": format_time(now),
        "attempt": attempt,
        "kind": "resize",
        "reason": reason,
        "message": message,
        "fromReplicas": replicas[0],
        "toReplicas": replicas[1],
        "restartTime": format_time(now),
        "recovery": "warm",
    }
    if step is not None:
        entry["step"] = step
    return [*(dict(e) for e in ledger), entry][-LEDGER_SIZE:]


def open_entry(ledger: Sequence[Mapping[str, Any]], attempt: int) -> int | None:
    """Index of the entry for an interruption of `attempt` not yet recovered from, if any."""
    for i in range(len(ledger) - 1, -1, -1):
        entry = ledger[i]
        if entry.get("attempt") == attempt and "secondsToRecover" not in entry:
            return i
    return None


def update(ledger: Sequence[Mapping[str, Any]], index: int, **fields: Any) -> list[dict[str, Any]]:
    """A copy of the ledger with `fields` set on entry `index`."""
    out = [dict(e) for e in ledger]
    out[index].update(fields)
    return out


def reclassify(
    ledger: Sequence[Mapping[str, Any]], index: int, interruption: Interruption
) -> list[dict[str, Any]]:
    """Entry `index` turned out to be `interruption` (a preemption seen late)."""
    return update(
        ledger,
        index,
        kind=interruption.kind,
        reason=interruption.reason,
        message=interruption.message,
    )


def mark_restarted(
    ledger: Sequence[Mapping[str, Any]],
    index: int,
    *,
    now: float,
    step: int | None,
    resume_step: int | None,
    recovery: str = "cold",
    unresponsive: tuple[int, ...] = (),
) -> list[dict[str, Any]]:
    """Entry `index` with its restart time and the steps lost by resuming at `resume_step`.

    `step` is the latest progress known at restart (a final checkpoint taken during the
    preemption's grace period may be newer than the progress seen at the interruption).
    `recovery` says how the group came back: `warm` (survivors kept) or `cold`.
    `unresponsive` names the replicas left behind because their peers reported them silent:
    their pods may never confirm their deletion, so the operator forces it (UNRESPONSIVE).
    """
    fields: dict[str, Any] = {"restartTime": format_time(now), "recovery": recovery}
    if unresponsive:
        fields[UNRESPONSIVE] = sorted(unresponsive)
    reached = _max_known(ledger[index].get("step"), step)
    if reached is not None and resume_step is not None:
        fields["stepsLost"] = max(0, reached - resume_step)
    return update(ledger, index, **fields)


def mark_recovered(
    ledger: Sequence[Mapping[str, Any]], index: int, *, now: float
) -> list[dict[str, Any]]:
    """Entry `index` with the seconds from the interruption until the group ran again."""
    since = parse_time(str(ledger[index]["time"]))
    return update(ledger, index, secondsToRecover=round(max(0.0, now - since), 3))


def open_tail(ledger: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indexes of the entries at the end of the ledger not yet recovered from (newest last).

    Usually one; a preemption followed by an elastic resize of the group that waited for
    its replacement leaves two, and the group training again recovers from both.
    """
    out: list[int] = []
    for i in range(len(ledger) - 1, -1, -1):
        if "secondsToRecover" in ledger[i]:
            break
        out.append(i)
    return out[::-1]


def unresponsive(ledger: Sequence[Mapping[str, Any]], attempt: int) -> frozenset[int]:
    """The replicas of `attempt` that a restart left behind as silent (entries that parse)."""
    return frozenset(
        index
        for entry in ledger
        if entry.get("attempt") == attempt
        for index in _indices(entry.get(UNRESPONSIVE))
    )


def _indices(raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        return ()
    return tuple(i for i in raw if type(i) is int and i >= 0)


def failure_times(ledger: Sequence[Mapping[str, Any]]) -> list[float]:
    """Times of the failures (hangs included) in the ledger, for the circuit breaker."""
    failures: tuple[Kind, ...] = ("failure", "hang")
    return [parse_time(str(e["time"])) for e in ledger if e.get("kind") in failures]


def observed_mtbf(status: Mapping[str, Any], now: float) -> float | None:
    """The job's mean time between interruptions so far, in seconds, or None before the first.

    The seconds since `startTime` over the interruptions counted (preemptions and failures:
    each loses the work since the last snapshot, whatever its cause), the maximum-likelihood
    estimate of a constant rate. The span includes the recoveries and any wait for capacity,
    so it errs long (checkpoints a little less often than the optimum), never short. Before
    the first interruption nothing is known of this job: None, and the checkpoint cadences
    keep their prior (spotrun.train.cadence.DEFAULT_MTBF_SECONDS).
    """
    try:
        count = int(status.get("preemptions") or 0) + int(status.get("failures") or 0)
        started = parse_time(str(status["startTime"]))
    except (KeyError, TypeError, ValueError):
        return None
    if count <= 0:
        return None
    return round(max(SHORTEST_MTBF_SECONDS, (now - started) / count), 1)


def _max_known(a: Any, b: int | None) -> int | None:
    known = [int(v) for v in (a, b) if v is not None]
    return max(known) if known else None
