"""Tells why a group stopped working: preemption, application failure, hang, or nothing.

The distinction matters because they are paid from different budgets: a preemption is
the cloud taking a node back and never spends `maxFailures`; a failure is the training
code's fault and does. Unschedulable replicas and image-pull errors are neither: a
restart would not fix them, so they are reported as a blocker (a condition), not an
interruption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from spotrun.lifecycle.hang import ProgressWatch
from spotrun.lifecycle.observation import (
    CONFIG_ERROR_REASONS,
    CRASH_LOOP,
    IMAGE_PULL_REASONS,
    UNSCHEDULABLE,
    ReplicaObservation,
)

Kind = Literal["preemption", "failure", "hang"]

# The runtime's workers exit with this code after honouring a preemption notice (SIGTERM
# agreed by every rank, final checkpoint written): the same value as
# spotrun.contract.EXIT_PREEMPTED, repeated so the policy imports nothing outside itself.
# A replica's code is its launcher's, and the launcher exits 75 only when it vouches for the
# notice (it forwarded one, or the worker's session said its group agreed on one); user code
# that exits 75 by itself makes the launcher exit 1. So the code alone is evidence here.
EXIT_PREEMPTED = 75

PREEMPTED = "Preempted"
PREEMPTION_NOTICE = "PreemptionNotice"
VANISHED = "Vanished"
OOM_KILLED = "OOMKilled"
ERROR = "Error"


@dataclass(frozen=True)
class Interruption:
    """The group of one attempt is broken: of which `kind`, why (`reason`, CamelCase), where."""

    kind: Kind
    reason: str
    message: str
    replicas: tuple[int, ...]


@dataclass(frozen=True)
class Blocker:
    """The group cannot start for a reason a restart would not fix; a person must act."""

    reason: str
    message: str


def classify(
    replicas: Sequence[ReplicaObservation],
    *,
    expected: int | Sequence[int],
    was_running: bool,
    now: float,
    watch: ProgressWatch | None = None,
) -> Interruption | None:
    """Classifies the replicas of ONE attempt; None when nothing is wrong.

    A preemption anywhere in the group wins over failures elsewhere: when one node is
    lost the other ranks die of it, and that is one preemption, not several failures.
    `was_running` says every replica of the attempt was seen running before, so one that
    is now pending or missing was replaced behind our back: it vanished. The hang check
    runs only when a `watch` is given (spotrun.lifecycle.hang), i.e. while the group runs.
    `expected` is the group: its size (replicas 0 to n - 1) or its replica indices.
    """
    preemption = _preemption(replicas, expected=expected, was_running=was_running)
    if preemption is not None:
        return preemption
    failed = [(r, reason) for r in replicas if (reason := _failure_reason(r)) is not None]
    if failed:
        reason = failed[0][1]
        details = "; ".join(_describe_failure(r, why) for r, why in failed)
        return Interruption("failure", reason, details, tuple(r.index for r, _ in failed))
    hung = watch.hang(now) if watch is not None else None
    if hung is not None:
        reason, message = hung
        return Interruption("hang", reason, message, tuple(r.index for r in replicas))
    return None


def preemption_of(replicas: Sequence[ReplicaObservation]) -> Interruption | None:
    """The preemption evidence among `replicas` alone (no vanished check), if any."""
    return _preemption(replicas, expected=0, was_running=False)


def blocker(replicas: Sequence[ReplicaObservation]) -> Blocker | None:
    """Why replicas that should be running cannot start, if a person has to fix it.

    Image and configuration errors come first: they are the user's to fix, while an
    Unschedulable replica may only be waiting for a spot node to come back.
    """
    for reasons in (IMAGE_PULL_REASONS, CONFIG_ERROR_REASONS, frozenset({UNSCHEDULABLE})):
        stuck = [r for r in replicas if r.waiting_reason in reasons and r.present]
        if stuck:
            first = stuck[0]
            reason = "ImagePullBackOff" if reasons is IMAGE_PULL_REASONS else first.waiting_reason
            indexes = ", ".join(str(r.index) for r in stuck)
            detail = f": {first.message}" if first.message else ""
            return Blocker(str(reason), f"replica {indexes}: {first.waiting_reason}{detail}")
    return None


def _preemption(
    replicas: Sequence[ReplicaObservation], *, expected: int | Sequence[int], was_running: bool
) -> Interruption | None:
    lost: list[tuple[int, str]] = []
    for r in replicas:
        if r.preempted:
            lost.append((r.index, r.preemption_reason or PREEMPTED))
        elif r.exit_code == EXIT_PREEMPTED:
            lost.append((r.index, PREEMPTION_NOTICE))
        elif was_running and r.phase in ("pending", "missing"):
            lost.append((r.index, VANISHED))
    if was_running:
        seen = {r.index for r in replicas if r.phase != "missing"}
        known = {i for i, _ in lost}
        lost.extend(
            (i, VANISHED)
            for i in (range(expected) if isinstance(expected, int) else expected)
            if i not in seen and i not in known
        )
    if not lost:
        return None
    # The first-hand evidence names the interruption: a replica flagged by the observer
    # rather than one that merely exited after the group agreed on a notice.
    lost.sort(key=lambda item: (item[1] == PREEMPTION_NOTICE, item[0]))
    reason = lost[0][1]
    where = ", ".join(f"replica {i} ({why})" for i, why in sorted(lost))
    return Interruption("preemption", reason, f"lost {where}", tuple(sorted(i for i, _ in lost)))


def _failure_reason(r: ReplicaObservation) -> str | None:
    """Why this replica counts as an application failure, or None."""
    if r.preempted or r.exit_code == EXIT_PREEMPTED:
        return None
    if r.phase == "failed":
        return _termination_reason(r)
    if r.restarts > 0 and r.exit_code != 0:
        return _termination_reason(r)
    if r.waiting_reason == CRASH_LOOP:
        return _termination_reason(r) if r.exit_code is not None else CRASH_LOOP
    return None


def _termination_reason(r: ReplicaObservation) -> str:
    # Kubernetes says "Error" for any non-zero exit; OOMKilled and other specific reasons
    # are kept because they tell the user what to change.
    if r.reason and r.reason not in ("Error", "Completed"):
        return r.reason
    return ERROR


def _describe_failure(r: ReplicaObservation, reason: str) -> str:
    parts = [f"replica {r.index}"]
    if r.exit_code is not None:
        parts.append(f"exited with code {r.exit_code}")
    parts.append(f"({reason})")
    if r.restarts:
        parts.append(f"after {r.restarts} container restart{'s' if r.restarts > 1 else ''}")
    if r.message:
        parts.append(f"- {r.message}")
    return " ".join(parts)
