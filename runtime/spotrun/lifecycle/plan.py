"""The restart policy: from spec, status and one observation to actions and a new status.

`plan` is pure and level-based: it reads what is, not what happened, so a lost event, a
restarted operator or a repeated pass cannot restart a group twice. Its output is a fixed
point: planning again with the same observation and the returned status changes nothing
and asks for nothing new.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spotrun.lifecycle.actions import Action
from spotrun.lifecycle.observation import Observation
from spotrun.lifecycle.spec import JobSpec


@dataclass(frozen=True)
class Plan:
    """What to do now (`actions`, in order) and the status to write (`status`).

    `status` is the whole status: the fields the policy owns (OWNED_FIELDS) updated,
    every other field (the runtime's checkpoints and metrics) copied unchanged.
    """

    actions: tuple[Action, ...]
    status: dict[str, Any]


def plan(
    spec: JobSpec,
    status: Mapping[str, Any],
    observation: Observation,
    jitter: random.Random | float = 0.5,
) -> Plan:
    """Decides the next actions and status of a TrainJob.

    `jitter` is the random draw for the backoff (a float in [0, 1) or a Random to draw
    it from), passed in so that a test can pin it.
    """
    raise NotImplementedError("plan is being written; the types above are stable")
