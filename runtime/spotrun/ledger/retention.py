"""Which committed checkpoints to keep: the latest, the best by score, and `numToKeep`.

Pure: it sees (seq, step, metrics) triples and returns seq numbers. It never proposes to
delete the latest checkpoint or one of the best, whatever the settings say.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spotrun.contract import CheckpointSettings

# How many best checkpoints the status lists when numToKeep does not bound them.
DEFAULT_BEST = 3


@dataclass(frozen=True)
class Candidate:
    seq: int
    step: int
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class Retention:
    keep: tuple[int, ...]
    delete: tuple[int, ...]
    best: tuple[int, ...]
    latest: int | None


def score_of(metrics: Mapping[str, Any], attribute: str) -> float | None:
    """The score a checkpoint reported, or None when it reported none (or not a number).

    As in Ray, a nested metric is named by its path joined with "/": `val/acc` is
    metrics["val"]["acc"] (a key spelled "val/acc" itself is found first).
    """
    value: Any = metrics.get(attribute)
    if value is None and "/" in attribute:
        value = metrics
        for part in attribute.split("/"):
            value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if math.isnan(value):
        return None
    return float(value)


def rank_by_score(candidates: Sequence[Candidate], attribute: str, order: str) -> list[Candidate]:
    """Scored candidates, best first; ties go to the newer checkpoint. Unscored ones are left out."""
    scored = [(score_of(c.metrics, attribute), c) for c in candidates]
    sign = -1.0 if order == "max" else 1.0
    ranked = sorted(
        ((s, c) for s, c in scored if s is not None), key=lambda sc: (sign * sc[0], -sc[1].seq)
    )
    return [c for _, c in ranked]


def plan_retention(candidates: Sequence[Candidate], settings: CheckpointSettings) -> Retention:
    if not candidates:
        return Retention(keep=(), delete=(), best=(), latest=None)
    by_seq = sorted(candidates, key=lambda c: c.seq)
    latest = by_seq[-1].seq
    limit = settings.num_to_keep

    best: list[int] = []
    if settings.score_attribute:
        ranked = rank_by_score(by_seq, settings.score_attribute, settings.score_order)
        best = [c.seq for c in ranked[: limit or DEFAULT_BEST]]

    if limit is None:
        keep = {c.seq for c in by_seq}
    elif settings.score_attribute:
        # Checkpoints without the score rank below every scored one (newest first), so a
        # run whose code never reports the score still keeps numToKeep checkpoints.
        scored = {c.seq for c in ranked}
        unscored = [c.seq for c in reversed(by_seq) if c.seq not in scored]
        keep = set(([c.seq for c in ranked] + unscored)[:limit])
    else:
        keep = {c.seq for c in by_seq[-limit:]}
    keep.add(latest)
    keep.update(best)

    delete = tuple(c.seq for c in by_seq if c.seq not in keep)
    return Retention(keep=tuple(sorted(keep)), delete=delete, best=tuple(best), latest=latest)
