"""Fault injection for `spotrun run`: when to take a replica away, which one, and how.

A local run is only a rehearsal of spot capacity if replicas are lost the ways a cloud
loses them: with notice (SIGTERM to the pod, as before a spot reclaim: the group commits
a final checkpoint and exits 75), without (SIGKILL to every process of the replica, as
when a node's processes die: their connections close), and silently (SIGSTOP to every
process of the replica, as when a node is powered off or cut off: nothing closes, nothing
answers, and only its peers can tell; the supervisor learns of it from their reports). This module decides when and which, from a seeded random.Random so
a run can be replayed; the supervisor (spotrun.local.supervisor) sends the signals.

Fault clocks run only while the group is training (every replica of the attempt running
and a progress report seen from it), and at most one fault hits an attempt: a fault that
lands while the group is still importing torch, or on a group already going down, would
test nothing. `--preempt-every 20s` therefore means 20 s of training between preemptions
(on average, with `--random-intervals`).
"""

from __future__ import annotations

import random
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

FaultKind = Literal["preempt", "kill", "freeze"]
KINDS: tuple[FaultKind, ...] = ("preempt", "kill", "freeze")

# preemption_reason of a replica lost to an injected fault, as status.interruptions shows it.
# A frozen replica has none: the supervisor does not flag it, its peers' reports do
# (spotrun.lifecycle.peers, reason PeerUnresponsive), as on a cluster.
REASONS: Mapping[FaultKind, str] = {"preempt": "InjectedPreemption", "kill": "InjectedKill"}
SIGNALS: Mapping[FaultKind, signal.Signals] = {
    "preempt": signal.SIGTERM,
    "kill": signal.SIGKILL,
    "freeze": signal.SIGSTOP,
}
DESCRIPTIONS: Mapping[FaultKind, str] = {
    "preempt": "SIGTERM to its launcher (a preemption with notice)",
    "kill": "SIGKILL to all its processes (a node lost without notice)",
    "freeze": "SIGSTOP to all its processes (a node gone silent: only its peers can tell)",
}

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in `text`: `20s`, `1m`, `1m30s`, `1.5h`, `500ms`, or a bare number of seconds.

    Raises ValueError with a message that shows the accepted forms.
    """
    raw = text.strip().lower()
    try:
        seconds = float(raw)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION.finditer(raw):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(raw) or not raw:
            raise ValueError(
                f"invalid duration {text!r}: expected a number with a unit, "
                "such as 20s, 1m, 1m30s, 500ms or 2h (a bare number means seconds)"
            ) from None
    if seconds <= 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"invalid duration {text!r}: it must be a positive, finite time")
    return seconds


def format_duration(seconds: float) -> str:
    """`1m30s`, `20s`, `0.5s`: the inverse of parse_duration, for messages."""
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s" if rest else f"{minutes}m"


@dataclass
class FaultSchedule:
    """When the next fault of each kind is due, counted in seconds of training.

    `every` maps each injected kind to its interval; `max_injections` caps the faults of
    all kinds together (None: no cap). `rng` picks the victims. With `random_intervals`,
    each interval is drawn from an exponential distribution whose mean is `every[kind]`
    (faults of a kind as a Poisson process, the usual model of spot reclaims), from `rng`
    too, so a seed replays them; otherwise each interval is exactly `every[kind]`, and the
    clocks are staggered: of n kinds, the i-th one's first interval is (1 + i/n) of its
    interval, so kinds of one period alternate (a fault every half period for two) instead
    of coming in pairs.
    """

    every: Mapping[FaultKind, float]
    max_injections: int | None = None
    rng: random.Random = field(default_factory=random.Random)
    random_intervals: bool = False
    injected: int = 0
    _trained: dict[FaultKind, float] = field(default_factory=dict)
    _interval: dict[FaultKind, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kinds = [kind for kind in KINDS if self.every.get(kind) is not None]
        for i, kind in enumerate(kinds):
            seconds = self.every[kind]
            if seconds <= 0:
                raise ValueError(f"the {kind} interval must be positive, got {seconds}")
            self._trained.setdefault(kind, 0.0)
            stagger = 0.0 if self.random_intervals else seconds * i / len(kinds)
            self._interval[kind] = self._draw(kind) + stagger

    def _draw(self, kind: FaultKind) -> float:
        mean = self.every[kind]
        return self.rng.expovariate(1.0 / mean) if self.random_intervals else mean

    @property
    def active(self) -> bool:
        """Some fault may still come."""
        return bool(self.every) and (
            self.max_injections is None or self.injected < self.max_injections
        )

    def advance(self, seconds: float) -> None:
        """The group trained for `seconds` more: every kind's clock moves."""
        for kind in self._trained:
            self._trained[kind] += max(0.0, seconds)

    def due(self) -> FaultKind | None:
        """The kind of fault to inject now, if one is due (the most overdue first)."""
        if not self.active:
            return None
        overdue = [
            (self._trained[kind] - self._interval[kind], kind)
            for kind in KINDS
            if kind in self.every and self._trained[kind] >= self._interval[kind]
        ]
        return max(overdue)[1] if overdue else None

    def remaining(self, kind: FaultKind) -> float | None:
        """Seconds of training before `kind` is due; None if it is not injected (any more)."""
        if kind not in self.every or not self.active:
            return None
        return max(0.0, self._interval[kind] - self._trained[kind])

    def choose(self, replicas: Sequence[int]) -> int:
        """The replica index to hit, drawn from `replicas`."""
        if not replicas:
            raise ValueError("no replica to inject a fault into")
        return self.rng.choice(sorted(replicas))

    def fired(self, kind: FaultKind) -> None:
        """A fault of `kind` was injected: its clock starts again, towards its next interval."""
        self._trained[kind] = 0.0
        self._interval[kind] = self._draw(kind)
        self.injected += 1
