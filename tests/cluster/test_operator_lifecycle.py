"""Suspend and resume, completion reported by the runtime, and ttlSecondsAfterFinished."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client

from spotrun.ledger.status import FencingError
from tests.cluster.operator_harness import (
    Operator,
    api,
    create,
    env_of,
    get_job,
    operator,
    patch_spec,
    pods,
    record_checkpoint,
    runtime_sink,
    status,
    trainjob,
    trainjob_crd,
    wait_running,
)
from tests.fixtures.cluster import Cluster, wait_until

FIXTURES = (api, operator, trainjob_crd)
JOB = "t5"


def replicas_of(api: client.ApiClient, namespace: str) -> int:
    return int(client.AppsV1Api(api).read_namespaced_stateful_set(JOB, namespace).spec.replicas)


def in_state(api: client.ApiClient, namespace: str, state: str) -> Any:
    def check() -> dict[str, Any] | None:
        st = status(api, namespace, JOB)
        return st if st.get("state") == state else None

    return check


def test_suspend_removes_the_pods_and_resume_brings_them_back_with_the_checkpoint(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    create(api, namespace, trainjob(JOB, replicas=2))
    wait_running(api, namespace, JOB, attempt=1, replicas=2)
    uri = record_checkpoint(runtime_sink(cluster, api, namespace, JOB, attempt=1), 9, 900)

    patch_spec(api, namespace, JOB, {"suspend": True})

    st = wait_until("Suspended", in_state(api, namespace, "Suspended"), timeout=60)
    wait_until("the pods to be gone", lambda: not pods(api, namespace, JOB), timeout=60)
    assert replicas_of(api, namespace) == 0
    assert (st["preemptions"], st["failures"]) == (0, 0)
    assert any(c["type"] == "Suspended" and c["status"] == "True" for c in st["conditions"])

    patch_spec(api, namespace, JOB, {"suspend": False})

    st = wait_running(api, namespace, JOB, attempt=2, replicas=2)
    assert (st["preemptions"], st["failures"]) == (0, 0)
    for pod in pods(api, namespace, JOB):
        assert env_of(pod)["SPOTRUN_RESUME_FROM"] == uri
        assert env_of(pod)["SPOTRUN_ATTEMPT"] == "2"


def test_completion_reported_by_the_runtime_succeeds_and_scales_to_zero(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    create(api, namespace, trainjob(JOB, replicas=2, ttlSecondsAfterFinished=3))
    wait_running(api, namespace, JOB, attempt=1, replicas=2)
    sink = runtime_sink(cluster, api, namespace, JOB, attempt=1)
    record_checkpoint(sink, 12, 1200)

    sink.completed(1200, time.time())

    st = wait_until("Succeeded", in_state(api, namespace, "Succeeded"), timeout=60)
    assert st["completion"]["attempt"] == 1
    assert "completionTime" in st
    assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in st["conditions"])
    assert replicas_of(api, namespace) == 0
    wait_until("the pods to be gone", lambda: not pods(api, namespace, JOB), timeout=60)

    # ttlSecondsAfterFinished: the operator deletes the job (and the GC its children).
    def deleted() -> bool:
        try:
            get_job(api, namespace, JOB)
        except client.exceptions.ApiException as err:
            return err.status == 404
        return False

    wait_until("the finished job to be deleted after its TTL", deleted, timeout=60)


def test_completion_of_an_older_attempt_is_not_taken_for_the_current_one(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    create(api, namespace, trainjob(JOB, replicas=1))
    wait_running(api, namespace, JOB, attempt=1, replicas=1)
    client.CoreV1Api(api).delete_namespaced_pod(f"{JOB}-0", namespace)
    wait_running(api, namespace, JOB, attempt=2, replicas=1)

    stale = runtime_sink(cluster, api, namespace, JOB, attempt=1)
    with pytest.raises(FencingError):
        stale.completed(10, time.time())
    st = status(api, namespace, JOB)
    assert (st["state"], st.get("completion")) == ("Running", None)
