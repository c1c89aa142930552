"""The pod contract: the environment the operator (or local mode) hands every spotrun pod.

One module names every variable, so the operator that writes them and the runtime that
reads them cannot drift apart. It imports nothing heavy: the operator imports it too.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

JOB = "SPOTRUN_JOB"
NAMESPACE = "SPOTRUN_NAMESPACE"
ATTEMPT = "SPOTRUN_ATTEMPT"
REPLICAS = "SPOTRUN_REPLICAS"
NPROC_PER_NODE = "SPOTRUN_NPROC_PER_NODE"
NODE_RANK = "SPOTRUN_NODE_RANK"
STORAGE = "SPOTRUN_STORAGE"
RESUME_FROM = "SPOTRUN_RESUME_FROM"
CONFIG = "SPOTRUN_CONFIG"
CHECKPOINT = "SPOTRUN_CHECKPOINT"
FUNCTION = "SPOTRUN_FUNCTION"
STATUS_SINK = "SPOTRUN_STATUS_SINK"
# Set by the operator: after success the launcher keeps the container alive until SIGTERM,
# since a StatefulSet's restartPolicy Always would otherwise rerun the training.
HOLD_AFTER_SUCCESS = "SPOTRUN_HOLD_AFTER_SUCCESS"
# Set from spec.recovery: "warm" lets a pod's launcher keep its workers through a lost member
# (they re-form the group in place); anything else restarts them with the group.
RECOVERY = "SPOTRUN_RECOVERY"
# Set by the launcher for its workers: the file it writes the next group into (warm only).
GROUP_FILE = "SPOTRUN_GROUP_FILE"
# Set on a warm spare's launcher and workers (its slot): they start, import, and wait for a
# group that promotes the slot (status.group.promoted) instead of joining one.
SPARE = "SPOTRUN_SPARE"
# Set from spec.elastic.batch on elastic jobs ("global" or "perReplica"; unset otherwise):
# what the data loader keeps when the group runs below spec.replicas.
ELASTIC_BATCH = "SPOTRUN_ELASTIC_BATCH"
# spec.replicas, the group's target size; SPOTRUN_REPLICAS is the size of the current group.
TARGET_REPLICAS = "SPOTRUN_TARGET_REPLICAS"
# Set by the operator on elastic jobs: replica {index}'s address (a template with the
# literal "{index}"). When an elastic group re-forms without replica 0, rank 0 moves.
MEMBER_ADDR = "SPOTRUN_MEMBER_ADDR"
# Set by the operator from spec.spares (unset when 0): the pool runs replicas + spares pods;
# a pod outside the group waits, as a spare, until a group names it.
SPARES = "SPOTRUN_SPARES"
# The MTBF (seconds) of the checkpoint cadences: SPOTRUN_MTBF_SECONDS is the user's own
# (trainer.env; `spotrun run` sets it to the injected faults' mean interval) and wins over
# the job's observed one, which the operator sets from status.group.mtbfSeconds on new pods
# and the launcher hands kept workers in their next group file.
MTBF = "SPOTRUN_MTBF_SECONDS"
OBSERVED_MTBF = "SPOTRUN_OBSERVED_MTBF_SECONDS"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
# trainer.env: how long (seconds) a warm group's member may stay silent before its peers
# report it lost (a node gone without notice, a partition); 0 turns the peer watch off.
PEER_TIMEOUT = "SPOTRUN_PEER_TIMEOUT_SECONDS"
DEFAULT_PEER_TIMEOUT_SECONDS = 10.0

# Timing, derived from the TrainJob's spec by `timing_env` (the operator and `spotrun run`
# both set them): the launcher's deadline after a SIGTERM, and how often rank 0 reports
# progress between checkpoints.
GRACE_SECONDS = "SPOTRUN_GRACE_SECONDS"
PROGRESS_SECONDS = "SPOTRUN_PROGRESS_SECONDS"


def observed_mtbf_env(seconds: float | None) -> dict[str, str]:
    """The environment that hands a group's observed MTBF to its workers ({} when none)."""
    return {} if seconds is None else {OBSERVED_MTBF: f"{seconds:g}"}


DEFAULT_NAMESPACE = "default"
DEFAULT_MASTER_PORT = 29500

# Kubernetes' default terminationGracePeriodSeconds (the lifecycle policy's
# spec.DEFAULT_GRACE_SECONDS is the same value: it waits that long for a final checkpoint).
DEFAULT_POD_GRACE_SECONDS = 30.0
# What the launcher keeps of the pod's grace for itself (SIGKILL what is left, exit) before
# the kubelet's own SIGKILL: this share of it, within the bounds below.
_LAUNCHER_MARGIN_SHARE = 0.2
_LAUNCHER_MARGIN_SECONDS = (1.0, 5.0)
# Progress reports: three per progressDeadlineSeconds, so one late report is no hang; never
# more often than every second (each is a status write), never rarer than every 10 s.
PROGRESS_REPORTS_PER_DEADLINE = 3
SHORTEST_PROGRESS_SECONDS = 1.0
LONGEST_PROGRESS_SECONDS = 10.0

# The launcher and its workers exit with this code when a preemption notice was honoured:
# the group agreed on it and committed a final checkpoint (EX_TEMPFAIL from sysexits.h).
EXIT_PREEMPTED = 75

# Set by the launcher for its workers, not by the operator: the write end of a pipe on which
# a worker's session says that it exits EXIT_PREEMPTED because its group agreed on a
# preemption notice. A worker on a node that was not preempted learns of the notice only
# through that agreement, so its launcher saw no signal; this is what vouches for its 75.
NOTICE_FD = "SPOTRUN_NOTICE_FD"

ScoreOrder = Literal["max", "min"]


class ContractError(ValueError):
    """The pod environment does not satisfy the contract; the message says which variable."""


@dataclass(frozen=True)
class CheckpointSettings:
    """`spec.checkpoint` of a TrainJob, minus the storage URL."""

    num_to_keep: int | None = None
    score_attribute: str | None = None
    score_order: ScoreOrder = "max"
    keep_all_ranks: bool = False
    async_save: bool = True

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> CheckpointSettings:
        order = spec.get("scoreOrder", "max")
        if order not in ("max", "min"):
            raise ContractError(f"checkpoint.scoreOrder must be 'max' or 'min', got {order!r}")
        num = spec.get("numToKeep")
        if num is not None and (not isinstance(num, int) or num < 1):
            raise ContractError(f"checkpoint.numToKeep must be an integer >= 1, got {num!r}")
        return cls(
            num_to_keep=num,
            score_attribute=spec.get("scoreAttribute"),
            score_order=order,
            keep_all_ranks=bool(spec.get("keepAllRanks", False)),
            async_save=bool(spec.get("async", True)),
        )

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "scoreOrder": self.score_order,
            "keepAllRanks": self.keep_all_ranks,
            "async": self.async_save,
        }
        if self.num_to_keep is not None:
            spec["numToKeep"] = self.num_to_keep
        if self.score_attribute is not None:
            spec["scoreAttribute"] = self.score_attribute
        return spec


@dataclass(frozen=True)
class PodContract:
    """What one pod (one node of the group) knows about its job and its place in it."""

    job: str
    namespace: str = DEFAULT_NAMESPACE
    attempt: int = 0
    replicas: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    storage: str = ""
    resume_from: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    function: str | None = None
    status_sink: str | None = None

    @property
    def world_size(self) -> int:
        return self.replicas * self.nproc_per_node

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PodContract:
        env = os.environ if env is None else env
        job = env.get(JOB, "")
        if not job:
            raise ContractError(
                f"{JOB} is not set: spotrun needs the pod contract environment "
                "(set by the operator, `spotrun run`, or by hand for a single process)"
            )
        return cls(
            job=job,
            namespace=env.get(NAMESPACE) or DEFAULT_NAMESPACE,
            attempt=_int(env, ATTEMPT, 0, minimum=0),
            replicas=_int(env, REPLICAS, 1, minimum=1),
            nproc_per_node=_int(env, NPROC_PER_NODE, 1, minimum=1),
            node_rank=_int(env, NODE_RANK, 0, minimum=0),
            storage=env.get(STORAGE, ""),
            resume_from=env.get(RESUME_FROM) or None,
            config=_json(env, CONFIG),
            checkpoint=CheckpointSettings.from_spec(_json(env, CHECKPOINT)),
            master_addr=env.get(MASTER_ADDR) or "127.0.0.1",
            master_port=_int(env, MASTER_PORT, DEFAULT_MASTER_PORT, minimum=1),
            function=env.get(FUNCTION) or None,
            status_sink=env.get(STATUS_SINK) or None,
        )

    def to_env(self) -> dict[str, str]:
        env = {
            JOB: self.job,
            NAMESPACE: self.namespace,
            ATTEMPT: str(self.attempt),
            REPLICAS: str(self.replicas),
            NPROC_PER_NODE: str(self.nproc_per_node),
            NODE_RANK: str(self.node_rank),
            STORAGE: self.storage,
            RESUME_FROM: self.resume_from or "",
            CONFIG: json.dumps(dict(self.config), sort_keys=True),
            CHECKPOINT: json.dumps(self.checkpoint.to_spec(), sort_keys=True),
            MASTER_ADDR: self.master_addr,
            MASTER_PORT: str(self.master_port),
        }
        if self.function:
            env[FUNCTION] = self.function
        if self.status_sink:
            env[STATUS_SINK] = self.status_sink
        return env


def pod_grace_seconds(spec: Mapping[str, Any]) -> float:
    """The effective terminationGracePeriodSeconds of a TrainJob's pods (`spec`, camelCase)."""
    pod = (spec.get("template") or {}).get("spec") or {}
    grace = pod.get("terminationGracePeriodSeconds")
    return DEFAULT_POD_GRACE_SECONDS if grace is None else float(grace)


def launcher_grace_seconds(pod_grace: float) -> float:
    """How long the launcher waits for its workers' final checkpoint after a SIGTERM.

    The pod's grace less a margin for the launcher itself to kill what is left and exit
    before the kubelet's SIGKILL: a fifth of the grace, at least 1 s and at most 5 s. So
    Kubernetes' default 30 s gives the workers 25 s, and 10 s gives them 8 s.
    """
    low, high = _LAUNCHER_MARGIN_SECONDS
    margin = min(high, max(low, _LAUNCHER_MARGIN_SHARE * pod_grace))
    return max(0.0, pod_grace - margin)


def progress_interval_seconds(
    deadline: float | None, *, longest: float = LONGEST_PROGRESS_SECONDS
) -> float:
    """How often rank 0 reports progress: a third of progressDeadlineSeconds, bounded.

    Never more often than SHORTEST_PROGRESS_SECONDS, never rarer than `longest` (10 s on a
    cluster; local mode asks for 1 s, for its live view).
    """
    if deadline is None:
        return longest
    return min(longest, max(SHORTEST_PROGRESS_SECONDS, deadline / PROGRESS_REPORTS_PER_DEADLINE))


def timing_env(
    spec: Mapping[str, Any], *, longest_progress: float = LONGEST_PROGRESS_SECONDS
) -> dict[str, str]:
    """SPOTRUN_GRACE_SECONDS and SPOTRUN_PROGRESS_SECONDS for the pods of a TrainJob `spec`."""
    deadline = (spec.get("failurePolicy") or {}).get("progressDeadlineSeconds")
    interval = progress_interval_seconds(
        None if deadline is None else float(deadline), longest=longest_progress
    )
    return {
        GRACE_SECONDS: f"{launcher_grace_seconds(pod_grace_seconds(spec)):g}",
        PROGRESS_SECONDS: f"{interval:g}",
    }


def announce_preempted_exit(local_rank: int, env: Mapping[str, str] | None = None) -> None:
    """Tells the launcher that this worker exits EXIT_PREEMPTED for an agreed notice.

    Called by the session just before it exits; a no-op outside `spotrun launch`, or where
    the descriptor is not the launcher's pipe (a process that inherited the variable only).
    """
    raw = (os.environ if env is None else env).get(NOTICE_FD)
    if not raw:
        return
    try:
        fd = int(raw)
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.write(fd, f"{local_rank}\n".encode())
    except (ValueError, OSError):
        return


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ContractError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ContractError(f"{name} must be >= {minimum}, got {value}")
    return value


def _json(env: Mapping[str, str], name: str) -> dict[str, Any]:
    raw = env.get(name)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ContractError(f"{name} is not valid JSON ({err.msg} at {err.pos})") from None
    if not isinstance(value, dict):
        raise ContractError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value
