"""The operator's own settings and the state its handlers share, kept in kopf's memo.

kopf hands each object's handlers a shallow copy of the operator-wide memo, so the
objects stored here (the API wrapper, the wake-ups, the node facts) are shared by every
TrainJob's loop and every watch handler, while per-job state lives in the job's loop.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spotrun_operator.children import Defaults
from spotrun_operator.observe import NodeFacts
from spotrun_operator.wakeups import JobKey, Wakeups

if TYPE_CHECKING:
    from spotrun_operator.apply import Api

METRICS_ADDRESS_ENV = "SPOTRUN_METRICS_ADDRESS"


@dataclass(frozen=True)
class Config:
    """Tunables, from the command line (spotrun_operator.cli) or the environment.

    `resync_seconds`: a job's loop runs at least this often even when nothing is heard
    (a lost watch event costs at most this much delay). `debounce_seconds`: the shortest
    time between two passes of a job woken by events: the first event after a quiet spell
    runs a pass at once, a burst (a group restart is dozens) one pass per interval.
    `metrics_address`: host:port of /metrics, empty to serve none. `defaults`: what jobs
    leave out (the chart's defaultCheckpointStorage and Workload Identity account).
    """

    resync_seconds: float = 60.0
    debounce_seconds: float = 0.2
    error_backoff_max_seconds: float = 60.0
    metrics_address: str = field(default_factory=lambda: os.environ.get(METRICS_ADDRESS_ENV, ""))
    defaults: Defaults = field(default_factory=lambda: Defaults.from_env(os.environ))


@dataclass
class Shared:
    """Operator-wide state, created at startup."""

    config: Config
    api: Api
    wakeups: Wakeups = field(default_factory=Wakeups)
    nodes: dict[str, NodeFacts] = field(default_factory=dict)
    # Per job, what pods said before they went: (attempt, index) -> preemption reason.
    evidence: dict[JobKey, dict[tuple[int, int], str]] = field(default_factory=dict)
    states: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(default_factory=random.Random)
    last_pass: float = 0.0
    started: float = field(default_factory=time.time)
