"""The actions a plan asks for: what the group should become, not API calls.

Every action is a desired state, so applying one twice is harmless, and `plan` repeats an
action until the observation shows it done. The operator turns them into StatefulSet and
pod changes, local mode into process starts and kills.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StartGroup:
    """Run the group as `attempt`, resumed from `resume_from` (None: from scratch).

    Replicas of any other attempt (left from before a suspend, or of unknown attempt)
    are removed, as for a restart.
    """

    attempt: int
    resume_from: str | None


@dataclass(frozen=True)
class RestartGroup:
    """Replace the group by incarnation `attempt` (already recorded in status.attempt).

    Every replica of another attempt is removed, except those in `keep` (a warm recovery:
    the survivors of the previous attempt re-form in place and join `attempt`), and the new
    ones resume from `resume_from`. `reason` is why (the interruption's reason);
    `not_before` the end of the backoff that preceded it.
    """

    attempt: int
    resume_from: str | None
    reason: str
    not_before: float
    keep: tuple[int, ...] = ()


@dataclass(frozen=True)
class Wait:
    """Nothing to do before `until` (seconds since the epoch) unless the observation changes."""

    until: float
    reason: str


@dataclass(frozen=True)
class Succeed:
    """The training finished: stop the group (the job is Succeeded)."""


@dataclass(frozen=True)
class Fail:
    """The job has failed for good: stop the group. `reason` is CamelCase, `message` for people."""

    reason: str
    message: str


@dataclass(frozen=True)
class Suspend:
    """spec.suspend is set: remove every replica, keep the job."""


@dataclass(frozen=True)
class DeleteJob:
    """ttlSecondsAfterFinished has passed since the job finished: delete the TrainJob."""


Action = StartGroup | RestartGroup | Wait | Succeed | Fail | Suspend | DeleteJob
