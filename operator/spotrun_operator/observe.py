"""Turns a TrainJob's pods and the cluster's nodes into the policy's Observation.

This is where Kubernetes' signals are read, and the only place: the policy decides from
facts (a replica is running, failed, was preempted and why), never from pod dicts. A
preemption is any loss the training code did not cause (DESIGN.md section 4):

- the pod condition DisruptionTarget=True, whatever its reason (EvictionByEvictionAPI,
  PreemptionByScheduler, DeletionByTaintManager, TerminationByKubelet, ...);
- the pod Failed with reason Terminated, Shutdown or NodeShutdown (graceful node shutdown);
- its node deleted, NotReady, tainted unreachable, or tainted for imminent termination;
- a pod of the current attempt being deleted, or replaced (a new UID) behind our back: the
  operator itself only ever deletes pods of older attempts.

Application failures (a non-zero exit, OOMKilled, a rising restartCount, CrashLoopBackOff)
are left as facts (exit code, reason, restarts) for the policy's classifier. Pure: dicts
in, dataclasses out, no clock and no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spotrun.lifecycle import Observation, Phase, ReplicaObservation, parse_time
from spotrun_operator import names

DISRUPTION_TARGET = "DisruptionTarget"
SHUTDOWN_REASONS = frozenset({"Terminated", "Shutdown", "NodeShutdown"})
UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"
OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"
# GKE taints a spot VM's node when Compute Engine announced its preemption.
IMPENDING_TERMINATION_TAINT = "cloud.google.com/impending-node-termination"

NODE_DELETED = "NodeDeleted"
NODE_NOT_READY = "NodeNotReady"
NODE_UNREACHABLE = "NodeUnreachable"
NODE_TERMINATING = "NodeTerminating"
POD_DELETED = "PodDeleted"
# Deleted with no grace (`deletionGracePeriodSeconds: 0`, a forced deletion): the API server
# removes the pod at once, and its processes get no time for a final checkpoint.
POD_FORCE_DELETED = "PodForceDeleted"
POD_REPLACED = "PodReplaced"
POD_LOST = "PodLost"
# Losses that leave no process behind to drain: the replica is reported failed, so the
# policy does not wait a grace period for a final checkpoint that cannot come.
GONE_REASONS = frozenset(
    {NODE_DELETED, NODE_NOT_READY, NODE_UNREACHABLE, POD_LOST, POD_FORCE_DELETED}
)

# A pod created this long after the attempt was seen running is a replacement, even when
# this process did not see the original (it restarted meanwhile). The margin absorbs clock
# skew between the operator and the API server, which stamps creationTimestamp.
REPLACED_AFTER_SECONDS = 5.0

_PHASES: dict[str, Phase] = {
    "Pending": "pending",
    "Running": "running",
    "Succeeded": "succeeded",
    "Failed": "failed",
    "Unknown": "running",
}


@dataclass(frozen=True)
class NodeFacts:
    """What a pod's node tells about the pod: lost (and why) or healthy."""

    name: str
    lost_reason: str | None = None


@dataclass
class SeenPods:
    """The UIDs of the current attempt's pods once the group was seen running.

    A pod of the same attempt and index with another UID was recreated by the
    StatefulSet controller after the original vanished, whether or not we saw it go.
    Kept in the operator's memory; after a restart of the operator, creation times
    relative to status.attemptStartTime stand in for it.
    """

    attempt: int = 0
    uids: dict[int, str] = field(default_factory=dict)

    def remember(self, attempt: int, replicas: Iterable[tuple[int, str]]) -> None:
        if attempt != self.attempt:
            self.attempt, self.uids = attempt, {}
        for index, uid in replicas:
            self.uids.setdefault(index, uid)

    def replaced(self, attempt: int, index: int, uid: str) -> bool:
        known = self.uids.get(index) if attempt == self.attempt else None
        return known is not None and known != uid


Evidence = Mapping[tuple[int, int], str]  # (attempt, index) -> preemption reason


def direct_evidence(pod: Mapping[str, Any]) -> tuple[tuple[int, int], str] | None:
    """The preemption a pod itself states (DisruptionTarget, a shutdown), keyed by replica.

    The StatefulSet controller replaces a failed or deleted pod within milliseconds, so a
    pass may only ever see the replacement. The watch handlers keep what each pod said in
    its last moments; a replacement of that replica then carries the original reason.
    """
    meta = pod.get("metadata") or {}
    attempt = _attempt(meta)
    if attempt is None:
        return None
    status = pod.get("status") or {}
    disruption = _condition(pod, DISRUPTION_TARGET)
    if _is_true(disruption) and disruption is not None:
        return (attempt, _index(meta)), str(disruption.get("reason") or DISRUPTION_TARGET)
    if status.get("phase") == "Failed" and status.get("reason") in SHUTDOWN_REASONS:
        return (attempt, _index(meta)), str(status["reason"])
    return None


def node_facts(node: Mapping[str, Any]) -> NodeFacts:
    """Whether a node still carries its pods: Ready, not unreachable, not going away."""
    name = str(node.get("metadata", {}).get("name", ""))
    taints = {str(t.get("key")) for t in (node.get("spec") or {}).get("taints") or []}
    if UNREACHABLE_TAINT in taints:
        return NodeFacts(name, NODE_UNREACHABLE)
    if OUT_OF_SERVICE_TAINT in taints or IMPENDING_TERMINATION_TAINT in taints:
        return NodeFacts(name, NODE_TERMINATING)
    ready = _condition(node, "Ready")
    if ready is not None and ready.get("status") != "True":
        return NodeFacts(name, NODE_NOT_READY)
    return NodeFacts(name)


def replica(
    pod: Mapping[str, Any],
    *,
    nodes: Mapping[str, NodeFacts],
    current_attempt: int,
    running_since: float | None = None,
    seen: SeenPods | None = None,
    evidence: Evidence | None = None,
) -> ReplicaObservation:
    """One pod as the policy sees it.

    `nodes` are the facts of the nodes that exist, by name. `running_since` is when the
    current attempt was first seen running (status.attemptStartTime), None if it has not
    been; `seen` the UIDs remembered since then; `evidence` what earlier pods of each
    replica said before they went (see direct_evidence).
    """
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    attempt = _attempt(meta)
    index = _index(meta)
    phase = _PHASES.get(str(status.get("phase") or "Pending"), "pending")
    trainer = _trainer_status(pod)
    state = trainer.get("state") or {}
    terminated = state.get("terminated") or (trainer.get("lastState") or {}).get("terminated")
    waiting = state.get("waiting") or {}
    exit_code = terminated.get("exitCode") if terminated else None
    reason = (terminated or {}).get("reason")
    message = (terminated or {}).get("message") or waiting.get("message")

    waiting_reason = waiting.get("reason")
    scheduled = _condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        waiting_reason = waiting_reason or scheduled.get("reason")
        message = message or scheduled.get("message")

    preemption = _preemption_reason(
        pod,
        phase=phase,
        nodes=nodes,
        current=attempt == current_attempt,
        running_since=running_since,
        seen=seen,
        index=index,
    )
    replaced = preemption == POD_REPLACED
    said = evidence.get((attempt, index)) if evidence and attempt is not None else None
    if said is not None and preemption in (None, POD_DELETED, POD_FORCE_DELETED, POD_REPLACED):
        # An earlier pod in this replica's place said why it went. A pod's own DisruptionTarget
        # and Failed phase stay once set, so one whose status says nothing is its replacement.
        replaced = replaced or preemption is None
        preemption = said
    if preemption in GONE_REASONS:
        phase = "failed"
    if phase == "failed" and preemption is None and exit_code is None:
        # A pod failed as a whole with no container exit to blame (e.g. Evicted by the
        # kubelet for disk pressure): its message says why.
        message = message or status.get("message")
        reason = reason or status.get("reason")
    return ReplicaObservation(
        index=index,
        attempt=attempt,
        phase=phase,
        exit_code=None if exit_code is None else int(exit_code),
        reason=None if reason is None else str(reason),
        preempted=preemption is not None,
        preemption_reason=preemption,
        restarts=int(trainer.get("restartCount") or 0),
        waiting_reason=None if waiting_reason is None else str(waiting_reason),
        ready=_is_true(_condition(pod, "Ready")),
        deleting=bool(meta.get("deletionTimestamp")),
        message=None if message is None else str(message)[:500],
        replaced=replaced,
    )


def observe(
    job: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    nodes: Mapping[str, NodeFacts],
    *,
    now: float,
    seen: SeenPods | None = None,
    evidence: Evidence | None = None,
) -> Observation:
    """The Observation of TrainJob `job` (its body) from its pods and the nodes that exist."""
    status = job.get("status") or {}
    spec = job.get("spec") or {}
    current = int(status.get("attempt") or 0)
    since_text = status.get("attemptStartTime")
    running_since = parse_time(str(since_text)) if since_text else None
    replicas = tuple(
        replica(
            pod,
            nodes=nodes,
            current_attempt=current,
            running_since=running_since,
            seen=seen,
            evidence=evidence,
        )
        for pod in sorted(pods, key=lambda p: str(p.get("metadata", {}).get("name", "")))
    )
    replicas += _gone_with_evidence(replicas, evidence or {})
    last = (status.get("lastMetrics") or {}).get("time")
    completion = status.get("completion") or {}
    completed = bool(completion) and int(completion.get("attempt", -1)) == current and current > 0
    generation = job.get("metadata", {}).get("generation")
    return Observation(
        now=now,
        replicas=replicas,
        last_progress_time=parse_time(str(last)) if last else None,
        completed=completed,
        suspended=bool(spec.get("suspend", False)),
        generation=None if generation is None else int(generation),
    )


def forget_evidence(evidence: dict[tuple[int, int], str], current: int) -> None:
    """Drops what the pods of attempts before the last restarted one said.

    The last one's is kept: it may still name why a replica of it vanished, and the policy
    refines the ledger with it until the new attempt runs.
    """
    for key in [key for key in evidence if key[0] < current - 1]:
        del evidence[key]


def _gone_with_evidence(
    replicas: tuple[ReplicaObservation, ...], evidence: Evidence
) -> tuple[ReplicaObservation, ...]:
    """The replicas whose pod is gone, with nothing in its place, after saying why it went.

    kopf drops a deleted pod from the index before the watch handler keeps what the pod
    said (direct_evidence), so a pass can see the replica missing first (Vanished) and the
    reason only later: this is how the policy learns it, even after the restart went out.
    """
    there = {(r.attempt, r.index) for r in replicas}
    return tuple(
        ReplicaObservation(
            index=index,
            attempt=attempt,
            phase="missing",
            preempted=True,
            preemption_reason=reason,
        )
        for (attempt, index), reason in sorted(evidence.items())
        if (attempt, index) not in there
    )


def remember_running(
    seen: SeenPods, job_status: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]
) -> None:
    """After a pass that left the job Running: remember the UIDs of the attempt's pods."""
    if job_status.get("state") != "Running":
        return
    attempt = int(job_status.get("attempt") or 0)
    seen.remember(
        attempt,
        (
            (_index(p.get("metadata") or {}), str(p["metadata"]["uid"]))
            for p in pods
            if _attempt(p.get("metadata") or {}) == attempt
            and not p["metadata"].get("deletionTimestamp")
            and p["metadata"].get("uid")
        ),
    )


def _preemption_reason(
    pod: Mapping[str, Any],
    *,
    phase: Phase,
    nodes: Mapping[str, NodeFacts],
    current: bool,
    running_since: float | None,
    seen: SeenPods | None,
    index: int,
) -> str | None:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    disruption = _condition(pod, DISRUPTION_TARGET)
    if _is_true(disruption):
        return str(disruption.get("reason") or DISRUPTION_TARGET) if disruption else None
    if phase == "failed" and status.get("reason") in SHUTDOWN_REASONS:
        return str(status["reason"])
    if str(status.get("phase")) == "Unknown":
        return POD_LOST
    node_name = (pod.get("spec") or {}).get("nodeName")
    if node_name:
        facts = nodes.get(str(node_name))
        if facts is None:
            return NODE_DELETED
        if facts.lost_reason is not None:
            return facts.lost_reason
    if not current:
        return None
    if meta.get("deletionTimestamp"):
        # A forced deletion shows as one update with the timestamp and a grace of 0, then
        # the pod's removal; waiting for a final checkpoint in between only delays the
        # restart until the removal's event.
        if meta.get("deletionGracePeriodSeconds") == 0:
            return POD_FORCE_DELETED
        return POD_DELETED
    uid = str(meta.get("uid") or "")
    if seen is not None and uid and seen.replaced(_attempt(meta) or 0, index, uid):
        return POD_REPLACED
    created = meta.get("creationTimestamp")
    if (
        running_since is not None
        and created
        and parse_time(str(created)) > running_since + REPLACED_AFTER_SECONDS
    ):
        return POD_REPLACED
    return None


def _attempt(meta: Mapping[str, Any]) -> int | None:
    raw = (meta.get("labels") or {}).get(names.ATTEMPT_LABEL)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _index(meta: Mapping[str, Any]) -> int:
    raw = (meta.get("labels") or {}).get(names.POD_INDEX_LABEL)
    if raw is None:
        raw = str(meta.get("name", "")).rsplit("-", 1)[-1]
    try:
        return int(raw)
    except ValueError:
        return -1


def _trainer_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == names.TRAINER_CONTAINER:
            found: Mapping[str, Any] = status
            return found
    return statuses[0] if statuses else {}


def _condition(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            found: Mapping[str, Any] = cond
            return found
    return None


def _is_true(cond: Mapping[str, Any] | None) -> bool:
    return cond is not None and cond.get("status") == "True"
