"""When a running attempt is hung: silent past its progress deadline, or never started training.

`progressDeadlineSeconds` measures the silence between progress reports of a group that
trains. It does not apply to start-up (imports, rendezvous, loading the checkpoint, the
first step): an attempt that has not reported yet is held to the start-up allowance
instead, `startupDeadlineSeconds`, by default the larger of 10 minutes and three progress
deadlines, so a group stuck before its first step is still found, only later.

An attempt has started training when the runtime's last report (status.lastMetrics.time)
is no older than the attempt's start (status.attemptStartTime, when every replica was
first seen running). Reports of an older attempt are older than that; a report the new
group made before the policy saw all its replicas running is taken for start-up until the
next one, which comes within a progress interval (a third of the deadline).
"""

from __future__ import annotations

from dataclasses import dataclass

from spotrun.lifecycle.spec import FailurePolicy

PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
STARTUP_DEADLINE_EXCEEDED = "StartupDeadlineExceeded"

# The start-up allowance when startupDeadlineSeconds is not set: at least this, and at
# least this many progress deadlines.
DEFAULT_STARTUP_SECONDS = 600.0
STARTUP_DEADLINES = 3


def startup_seconds(policy: FailurePolicy) -> float | None:
    """How long a running attempt may take to its first progress report; None: no limit."""
    if policy.startup_deadline_seconds is not None:
        return policy.startup_deadline_seconds
    if policy.progress_deadline_seconds is None:
        return None
    return max(DEFAULT_STARTUP_SECONDS, STARTUP_DEADLINES * policy.progress_deadline_seconds)


@dataclass(frozen=True)
class ProgressWatch:
    """The silence a running attempt is held to now: from `since`, at most `seconds`.

    `starting`: the attempt has not reported progress yet, so the start-up allowance applies.
    """

    since: float
    seconds: float
    starting: bool
    setting: str  # which setting gave `seconds`, for the message

    @property
    def until(self) -> float:
        """When the attempt is hung if nothing is reported before."""
        return self.since + self.seconds

    def hang(self, now: float) -> tuple[str, str] | None:
        """(reason, message) once the silence is longer than allowed, else None."""
        silent = now - self.since
        if silent <= self.seconds:
            return None
        if self.starting:
            return (
                STARTUP_DEADLINE_EXCEEDED,
                f"no progress reported {silent:.0f}s after every replica started, more than "
                f"the start-up allowance {self.setting}",
            )
        return (
            PROGRESS_DEADLINE_EXCEEDED,
            f"no progress reported for {silent:.0f}s, more than {self.setting}",
        )


def progress_watch(
    policy: FailurePolicy, *, attempt_start: float | None, last_progress: float | None
) -> ProgressWatch | None:
    """The watch on a running attempt that started at `attempt_start`; None: nothing to watch."""
    if attempt_start is None:
        return None
    deadline = policy.progress_deadline_seconds
    if last_progress is not None and last_progress >= attempt_start:
        if deadline is None:
            return None
        return ProgressWatch(
            last_progress, deadline, False, f"failurePolicy.progressDeadlineSeconds={deadline:g}"
        )
    allowance = startup_seconds(policy)
    if allowance is None:
        return None
    if policy.startup_deadline_seconds is not None:
        setting = f"failurePolicy.startupDeadlineSeconds={allowance:g}"
    else:
        setting = (
            f"of {allowance:g}s (failurePolicy.startupDeadlineSeconds is not set: the larger "
            f"of {DEFAULT_STARTUP_SECONDS:g}s and {STARTUP_DEADLINES} x progressDeadlineSeconds)"
        )
    return ProgressWatch(attempt_start, allowance, True, setting)
