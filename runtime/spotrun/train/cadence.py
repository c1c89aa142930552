"""How often to checkpoint: Young/Daly's interval from the measured cost and preemption rate.

With checkpoint cost C (seconds the training loop loses per checkpoint) and a mean time
between preemptions M, the interval that minimises expected lost work is about sqrt(2*C*M)
(Young 1974; Daly 2006). Pure arithmetic; the session feeds it measurements.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from spotrun import contract
from spotrun.lifecycle.times import positive_seconds

DEFAULT_MTBF_SECONDS = 3600.0  # spot VMs: roughly hourly preemptions is a cautious prior


def mtbf_seconds(env: Mapping[str, str] | None = None) -> tuple[float, str]:
    """The MTBF the cadences assume, and where it came from (for the log).

    SPOTRUN_MTBF_SECONDS (trainer.env) is the user's word and must be a positive number;
    else SPOTRUN_OBSERVED_MTBF_SECONDS, the job's own from its ledger (status.group.
    mtbfSeconds, from the second attempt on), ignored unless a positive number; else the
    prior, DEFAULT_MTBF_SECONDS.
    """
    env = os.environ if env is None else env
    raw = env.get(contract.MTBF, "").strip()
    if raw:
        value = positive_seconds(raw)
        if value is None:
            raise ValueError(
                f"{contract.MTBF} must be a positive number of seconds (the mean time between "
                f"preemptions the checkpoint cadences assume), got {raw!r}"
            )
        return value, contract.MTBF
    observed = positive_seconds(env.get(contract.OBSERVED_MTBF))
    if observed is not None:
        return observed, "observed: status.group.mtbfSeconds"
    return DEFAULT_MTBF_SECONDS, "the default: no interruption yet"


def young_daly_interval(
    cost_seconds: float, mtbf_seconds: float, *, floor: float = 1.0, ceiling: float = 3600.0
) -> float:
    if cost_seconds < 0 or mtbf_seconds <= 0:
        raise ValueError(f"need cost >= 0 and MTBF > 0, got {cost_seconds}, {mtbf_seconds}")
    return min(ceiling, max(floor, math.sqrt(2.0 * cost_seconds * mtbf_seconds)))


@dataclass
class Cadence:
    """Tracks checkpoint cost (an exponential moving average) and says when one is due."""

    mtbf_seconds: float = DEFAULT_MTBF_SECONDS
    cost_seconds: float | None = None
    last_checkpoint: float | None = None
    smoothing: float = 0.3
    # The shortest interval: a bucket checkpoint's upload takes longer than its stall, and
    # a snapshot kept in memory (a cheap copy) may be taken far more often.
    floor_seconds: float = 1.0

    def observe(self, cost_seconds: float, now: float) -> None:
        if self.cost_seconds is None:
            self.cost_seconds = cost_seconds
        else:
            self.cost_seconds += self.smoothing * (cost_seconds - self.cost_seconds)
        self.last_checkpoint = now

    def interval(self) -> float | None:
        if self.cost_seconds is None:
            return None
        return young_daly_interval(self.cost_seconds, self.mtbf_seconds, floor=self.floor_seconds)

    def reset(self, now: float) -> None:
        """A snapshot of this tier was taken by other means (its cost not measured): the
        interval counts from now."""
        self.last_checkpoint = now

    def due(self, now: float) -> bool:
        """The first checkpoint is due at once (it measures the cost); then every interval."""
        interval = self.interval()
        if interval is None or self.last_checkpoint is None:
            return True
        return now - self.last_checkpoint >= interval
