"""What one pass saw of a TrainJob's group: the replicas and the runtime's reports.

The operator builds it from pods and nodes, local mode from its worker processes; the
policy sees only this, so both are supervised by the same decisions. It holds facts, not
judgements: whether a lost replica was preempted is decided by the observer that can see
nodes and pod conditions, whether the group must restart is decided by the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Phase = Literal["missing", "pending", "running", "succeeded", "failed"]

# Waiting reasons that mean the replica cannot start for a reason a restart would not fix:
# they become a condition a person can act on, never a restart.
IMAGE_PULL_REASONS = frozenset(
    {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
)
UNSCHEDULABLE = "Unschedulable"
CONFIG_ERROR_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError"})
CRASH_LOOP = "CrashLoopBackOff"


@dataclass(frozen=True)
class ReplicaObservation:
    """One replica (a pod, or a local node of processes) as last seen.

    `attempt` is the group incarnation the replica was started for (the pod's attempt
    label), None when it cannot be told. `exit_code` and `reason` describe the last
    termination of its container (the current one if terminated, else the previous), so a
    container that crashed and was restarted in place still shows why. `preempted` is set
    by the observer for any loss not caused by the training code: a DisruptionTarget
    condition, a node shut down, lost or deleted, a pod replaced or vanished, an injected
    fault in local mode; `preemption_reason` says which. `replaced` is set when what is seen
    is a replacement (a new pod in the lost one's place): whatever it is doing, it never got
    the notice, so nobody waits for it to write a final checkpoint. `unresponsive` is set
    when its peers report it silent (spotrun.lifecycle.peers): it still runs, as far as its
    pod says, but answers nobody, so nobody waits for it either.
    """

    index: int
    attempt: int | None = None
    phase: Phase = "pending"
    exit_code: int | None = None
    reason: str | None = None
    preempted: bool = False
    preemption_reason: str | None = None
    restarts: int = 0
    waiting_reason: str | None = None
    ready: bool = False
    deleting: bool = False
    message: str | None = None
    replaced: bool = False
    unresponsive: bool = False

    @property
    def present(self) -> bool:
        """The replica exists and nobody asked for its removal yet."""
        return self.phase != "missing" and not self.deleting


@dataclass(frozen=True)
class Observation:
    """One pass's view of a TrainJob: time, replicas and what the runtime reported.

    `now` and `last_progress_time` are seconds since the epoch. `last_progress_time` is
    the time of the runtime's last report (status.lastMetrics.time), None before the first.
    `completed` is true once rank 0 reported that the training function returned.
    `suspended` mirrors spec.suspend. `generation` is metadata.generation, copied into
    status.observedGeneration and the conditions.
    """

    now: float
    replicas: tuple[ReplicaObservation, ...] = ()
    last_progress_time: float | None = None
    completed: bool = False
    suspended: bool = False
    generation: int | None = None

    def of_attempt(self, attempt: int) -> tuple[ReplicaObservation, ...]:
        """The replicas started for `attempt`, in index order."""
        return tuple(
            sorted((r for r in self.replicas if r.attempt == attempt), key=lambda r: r.index)
        )

    def stale(self, attempt: int) -> tuple[ReplicaObservation, ...]:
        """Replicas of any other (older or unknown) attempt that still exist."""
        return tuple(r for r in self.replicas if r.attempt != attempt and r.present)
