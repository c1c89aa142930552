"""What the operator keeps in memory of pods, StatefulSets and nodes, and who it wakes.

kopf's indexes hold, per TrainJob, slim copies of its pods and StatefulSet (only the
fields the observer reads, in the API's shape), so a pass reads memory, not the API,
and the memory stays small with thousands of pods. Only objects labelled
`spotrun.dev/job` are indexed. Nodes are indexed by name as NodeFacts (a few bytes
each), and pods also by node, so a node event wakes only the jobs with pods on it.

kopf does not call index functions for deletions, so the wake-ups come from separate
`on.event` handlers, which kopf calls after the indexes were updated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from spotrun_operator import metrics, names
from spotrun_operator.observe import direct_evidence, node_facts
from spotrun_operator.wakeups import JobKey

# Pod conditions the observer reads.
_POD_CONDITIONS = frozenset({"DisruptionTarget", "Ready", "PodScheduled"})


def job_key(namespace: str | None, labels: Mapping[str, str]) -> JobKey | None:
    job = labels.get(names.JOB_LABEL)
    if not job or not namespace:
        return None
    return (namespace, job)


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a pod that spotrun_operator.observe reads, in the same shape."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    labels = meta.get("labels") or {}
    slim_meta: dict[str, Any] = {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
        "creationTimestamp": meta.get("creationTimestamp"),
        "labels": {
            k: v
            for k, v in labels.items()
            if k in (names.JOB_LABEL, names.ATTEMPT_LABEL, names.POD_INDEX_LABEL)
        },
    }
    if meta.get("deletionTimestamp"):
        slim_meta["deletionTimestamp"] = meta["deletionTimestamp"]
        slim_meta["deletionGracePeriodSeconds"] = meta.get("deletionGracePeriodSeconds")
    slim_status: dict[str, Any] = {
        key: status[key] for key in ("phase", "reason", "message") if status.get(key)
    }
    slim_status["conditions"] = [
        {k: c[k] for k in ("type", "status", "reason", "message") if k in c}
        for c in status.get("conditions") or []
        if c.get("type") in _POD_CONDITIONS
    ]
    slim_status["containerStatuses"] = [
        {
            "name": c.get("name"),
            "restartCount": c.get("restartCount", 0),
            "ready": c.get("ready", False),
            "state": _slim_state(c.get("state") or {}),
            "lastState": _slim_state(c.get("lastState") or {}),
        }
        for c in status.get("containerStatuses") or []
        if c.get("name") == names.TRAINER_CONTAINER
    ]
    return {
        "metadata": slim_meta,
        "spec": {"nodeName": (body.get("spec") or {}).get("nodeName")},
        "status": slim_status,
    }


def _slim_state(state: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if state.get("terminated"):
        t = state["terminated"]
        out["terminated"] = {k: t[k] for k in ("exitCode", "reason", "message") if k in t}
    if state.get("waiting"):
        w = state["waiting"]
        out["waiting"] = {k: w[k] for k in ("reason", "message") if k in w}
    if "running" in state and state["running"] is not None:
        out["running"] = {}
    return out


def slim_statefulset(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the loop needs of its StatefulSet: is it ours, current, and processed."""
    meta = body.get("metadata") or {}
    return {
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "generation": meta.get("generation"),
        "specHash": (meta.get("annotations") or {}).get(names.SPEC_HASH_ANNOTATION),
        "replicas": (body.get("spec") or {}).get("replicas"),
        "observedGeneration": (body.get("status") or {}).get("observedGeneration"),
    }


async def pod_changed(memo: Mapping[str, Any], key: JobKey | None, body: Mapping[str, Any]) -> None:
    """Keeps the pod's own preemption evidence (it may be replaced before a pass sees it)."""
    shared = memo.get("shared")
    if key is None or shared is None:
        return
    found = direct_evidence(body)
    if found is not None:
        replica, reason = found
        shared.evidence.setdefault(key, {})[replica] = reason
    await wake(memo, key)


async def wake(memo: Mapping[str, Any], key: JobKey | None) -> None:
    """Wakes the loop of job `key` (a no-op before start-up finished or for foreign objects)."""
    shared = memo.get("shared")
    if key is not None and shared is not None:
        metrics.WATCH_EVENT.set(time.time())
        await shared.wakeups.poke(key)


async def wake_node(
    memo: Mapping[str, Any],
    name: str,
    event_type: str | None,
    body: Mapping[str, Any],
    pods_by_node: Mapping[str, Iterable[JobKey]],
) -> None:
    """Wakes the jobs with pods on node `name` when its health changed or it was deleted.

    Nodes report status every few seconds; only a change of what the observer reads
    (NodeFacts) wakes anyone.
    """
    shared = memo.get("shared")
    if shared is None:
        return
    facts = None if event_type == "DELETED" else node_facts(body)
    if shared.nodes.get(name) == facts and facts is not None:
        return
    if facts is None:
        shared.nodes.pop(name, None)
    else:
        shared.nodes[name] = facts
    for key in set(pods_by_node.get(name, ())):
        await shared.wakeups.poke(key)
