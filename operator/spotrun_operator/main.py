"""kopf's registrations, and nothing else: every handler delegates to spotrun_operator.handlers.

Reading this file tells what the operator listens to: one daemon per TrainJob (the only
place decisions are taken), label-filtered indexes of the jobs' pods and StatefulSets, an
index of node health, and watch handlers that only wake the right job's daemon.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from spotrun_operator import names
from spotrun_operator.config import Shared
from spotrun_operator.handlers import indexes, reconcile, startup
from spotrun_operator.observe import NodeFacts, node_facts
from spotrun_operator.wakeups import JobKey

OURS = {names.JOB_LABEL: kopf.PRESENT}


@kopf.on.startup()
async def on_startup(*, settings: kopf.OperatorSettings, memo: Any, **kwargs: Any) -> None:
    await startup.start(settings=settings, memo=memo, **kwargs)


@kopf.on.cleanup()
async def on_cleanup(*, memo: Any, **kwargs: Any) -> None:
    await startup.stop(memo=memo, **kwargs)


@kopf.on.probe(id="spotrun")
def on_probe(*, memo: Any, **kwargs: Any) -> dict[str, Any]:
    return startup.probe(memo=memo, **kwargs)


# -- indexes: what the daemons read ------------------------------------------------------


@kopf.index("pods", labels=OURS)
def trainjob_pods(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[JobKey, dict[str, Any]] | None:
    key = indexes.job_key(namespace, labels)
    return None if key is None else {key: indexes.slim_pod(body)}


@kopf.index("pods", labels=OURS)
def pods_by_node(
    *, namespace: str | None, labels: Mapping[str, str], spec: kopf.Spec, **_: Any
) -> dict[str, JobKey] | None:
    key = indexes.job_key(namespace, labels)
    node = spec.get("nodeName")
    return None if key is None or not node else {str(node): key}


@kopf.index("statefulsets.apps", labels=OURS)
def trainjob_statefulsets(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[JobKey, dict[str, Any]] | None:
    key = indexes.job_key(namespace, labels)
    return None if key is None else {key: indexes.slim_statefulset(body)}


@kopf.index("nodes")
def node_health(*, name: str, body: kopf.Body, **_: Any) -> dict[str, NodeFacts]:
    return {name: node_facts(body)}


# -- wake-ups: a change to a job's pods, StatefulSet, nodes or itself runs its loop -------


@kopf.on.event("pods", labels=OURS)
async def pod_changed(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, memo: Any, **_: Any
) -> None:
    await indexes.pod_changed(memo, indexes.job_key(namespace, labels), body)


@kopf.on.event("statefulsets.apps", labels=OURS)
async def statefulset_changed(
    *, namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
) -> None:
    await indexes.wake(memo, indexes.job_key(namespace, labels))


@kopf.on.event("nodes")
async def node_changed(
    *,
    name: str,
    type: str,
    body: kopf.Body,
    memo: Any,
    **kwargs: Any,
) -> None:
    await indexes.wake_node(memo, name, type, body, kwargs["pods_by_node"])


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL)
async def trainjob_changed(*, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    if namespace:
        await indexes.wake(memo, (namespace, name))


# -- the reconcile loop: one per TrainJob -------------------------------------------------


@kopf.daemon(
    names.GROUP,
    names.VERSION,
    names.PLURAL,
    id="reconcile",
    cancellation_backoff=2.0,
    cancellation_timeout=10.0,
)
async def trainjob_daemon(
    *,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: Any,
    stopped: kopf.DaemonStopped,
    **indices: Any,
) -> None:
    """Reads the indexes above, which kopf passes by their functions' names."""
    shared: Shared = memo["shared"]
    await reconcile.run(
        shared=shared,
        namespace=str(namespace),
        name=name,
        body=body,
        pods=indices["trainjob_pods"],
        statefulsets=indices["trainjob_statefulsets"],
        nodes=indices["node_health"],
        stopped=stopped,
    )
