"""Each real preemption signal gives exactly one group restart, resumed from the checkpoint.

The signals are produced the way the cloud and Kubernetes produce them: a pod deleted, a
pod evicted through the Eviction API (DisruptionTarget=EvictionByEvictionAPI), its node
deleted, a pod failed by a node shutdown (what the kubelet writes: phase Failed, reason
Shutdown or NodeShutdown, DisruptionTarget=TerminationByKubelet). Each must bump the
attempt once and count one preemption and no failure. With warm recovery (the default) the
surviving pod stays (same UID, relabelled to the new attempt) and only the lost one is
replaced, carrying SPOTRUN_RESUME_FROM = the latest checkpoint's URI; with cold recovery
every pod is new and carries it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.operator_harness import (
    Operator,
    api,
    create,
    env_of,
    operator,
    pods,
    record_checkpoint,
    runtime_sink,
    status,
    temp_nodes,
    trainjob,
    trainjob_crd,
    wait_running,
)
from tests.fixtures.cluster import Cluster, wait_until

FIXTURES = (api, operator, trainjob_crd)
JOB = "llm"


def holds(what: str, check: Callable[[], bool], seconds: float = 6.0) -> None:
    """Asserts `check` stays true while the operator gets several passes to do something wrong."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), what
        time.sleep(0.5)


def assert_one_restart(
    api: client.ApiClient, namespace: str, uri: str, survivor: Mapping[str, Any]
) -> None:
    """One warm restart: `survivor` (the pod not preempted) kept, the lost one replaced."""
    st = wait_running(api, namespace, JOB, attempt=2, replicas=2)
    assert (st["preemptions"], st["failures"]) == (1, 0), st
    [interruption] = st["interruptions"]
    assert (interruption["kind"], interruption["recovery"]) == ("preemption", "warm")
    index = int(survivor["metadata"]["labels"]["apps.kubernetes.io/pod-index"])
    mtbf = st["group"]["mtbfSeconds"]  # the seconds since the job started: one preemption
    assert st["group"] == {
        "attempt": 2,
        "mode": "warm",
        "replicas": 2,
        "kept": [index],
        "mtbfSeconds": mtbf,
    }
    assert 0 < mtbf < 3600, st
    live = pods(api, namespace, JOB)
    assert {p["metadata"]["labels"]["spotrun.dev/attempt"] for p in live} == {"2"}
    for pod in live:
        if pod["metadata"]["name"] == survivor["metadata"]["name"]:
            # The same pod: its launcher follows status.group, its env stays as created.
            assert pod["metadata"]["uid"] == survivor["metadata"]["uid"]
            continue
        assert env_of(pod)["SPOTRUN_RESUME_FROM"] == uri
        assert env_of(pod)["SPOTRUN_ATTEMPT"] == "2"
        # Its checkpoint cadences assume the job's MTBF so far (the survivor's come from
        # its next group file).
        assert env_of(pod)["SPOTRUN_OBSERVED_MTBF_SECONDS"] == f"{mtbf:g}"

    def still_one() -> bool:
        now = status(api, namespace, JOB)
        return (now["attempt"], now["preemptions"], now["failures"]) == (2, 1, 0)

    holds("exactly one group restart", still_one)


def start_with_checkpoint(
    api: client.ApiClient, cluster: Cluster, namespace: str, **spec: Any
) -> str:
    create(api, namespace, trainjob(JOB, replicas=2, **spec))
    wait_running(api, namespace, JOB, attempt=1, replicas=2)
    return record_checkpoint(runtime_sink(cluster, api, namespace, JOB, attempt=1), 7, 700)


def delete_pod(core: client.CoreV1Api, namespace: str) -> str:
    core.delete_namespaced_pod(f"{JOB}-0", namespace)
    return "PodDeleted"


def evict_pod(core: client.CoreV1Api, namespace: str) -> str:
    core.create_namespaced_pod_eviction(
        f"{JOB}-0",
        namespace,
        client.V1Eviction(metadata=client.V1ObjectMeta(name=f"{JOB}-0", namespace=namespace)),
    )
    return "EvictionByEvictionAPI"


def node_shutdown(reason: str) -> Callable[[client.CoreV1Api, str], str]:
    def shut_down(core: client.CoreV1Api, namespace: str) -> str:
        # What the kubelet's graceful node shutdown manager writes before the node goes.
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        core.patch_namespaced_pod_status(
            f"{JOB}-0",
            namespace,
            {
                "status": {
                    "phase": "Failed",
                    "reason": reason,
                    "message": "Pod was terminated in response to imminent node shutdown.",
                    "conditions": [
                        {
                            "type": "DisruptionTarget",
                            "status": "True",
                            "reason": "TerminationByKubelet",
                            "message": "Pod was terminated in response to imminent node shutdown.",
                            "lastTransitionTime": now,
                        }
                    ],
                }
            },
        )
        return "TerminationByKubelet"

    return shut_down


SIGNALS: dict[str, Callable[[client.CoreV1Api, str], str]] = {
    "pod-deleted": delete_pod,
    "pod-evicted": evict_pod,
    "node-shutdown": node_shutdown("Shutdown"),
    "node-shutdown-reason": node_shutdown("NodeShutdown"),
    "terminated": node_shutdown("Terminated"),
}


@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_preemption_signal_restarts_the_group_once_from_the_checkpoint(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator, signal: str
) -> None:
    uri = start_with_checkpoint(api, cluster, namespace)
    survivor = next(p for p in pods(api, namespace, JOB) if p["metadata"]["name"] == f"{JOB}-1")

    reason = SIGNALS[signal](client.CoreV1Api(api), namespace)

    assert_one_restart(api, namespace, uri, survivor)
    assert status(api, namespace, JOB)["interruptions"][0]["reason"] == reason
    assert not operator.tracebacks(), operator.log()


def test_a_recorded_notice_restarts_the_group_before_the_reclaimed_pod_is_gone(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    """Rank 0's status.noticeHonoured ends the wait for the final checkpoint at once.

    The reclaimed pod takes 20 s to go (KWOK's delete delay: a kubelet reporting its
    container's exit late); without the mark the policy waits for it, up to the pod's
    grace (30 s), since it may still be writing the final checkpoint.
    """
    template = {
        "metadata": {"annotations": {"pod-delete.stage.kwok.x-k8s.io/delay": "20s"}},
        "spec": {"nodeSelector": {"cloud.google.com/gke-spot": "true"}},
    }
    start_with_checkpoint(api, cluster, namespace, template=template)
    core = client.CoreV1Api(api)
    reclaimed = core.read_namespaced_pod(f"{JOB}-0", namespace)
    core.delete_namespaced_pod(f"{JOB}-0", namespace)
    wait_until(
        "the preemption counted",
        lambda: (
            (st := status(api, namespace, JOB))["preemptions"] == 1 and st["state"] == "Restarting"
        ),
    )
    holds(
        "no restart while the reclaimed replica may still write",
        lambda: status(api, namespace, JOB)["attempt"] == 1,
        seconds=3,
    )

    sink = runtime_sink(cluster, api, namespace, JOB, attempt=1)
    sink.progress({"loss": 0.5}, 800, time.time(), honoured=True)

    st = wait_until(
        "the restart", lambda: (s := status(api, namespace, JOB))["attempt"] == 2 and s, timeout=10
    )
    assert st["noticeHonoured"]["attempt"] == 1 and st["preemptions"] == 1, st
    # The restart did not wait for the reclaimed pod: it is still going.
    still = core.read_namespaced_pod(f"{JOB}-0", namespace)
    assert still.metadata.uid == reclaimed.metadata.uid and still.metadata.deletion_timestamp
    wait_running(api, namespace, JOB, attempt=2, replicas=2)
    assert not operator.tracebacks(), operator.log()


def test_node_deleted_restarts_the_group_once_from_the_checkpoint(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    with temp_nodes(cluster, namespace[-12:], count=3) as pool:
        template = {"spec": {"nodeSelector": {"cloud.google.com/gke-spot": "true", **pool}}}
        uri = start_with_checkpoint(api, cluster, namespace, template=template)
        live = {p["metadata"]["name"]: p for p in pods(api, namespace, JOB)}
        node = live[f"{JOB}-0"]["spec"]["nodeName"]
        survivor = live[f"{JOB}-1"]
        if survivor["spec"]["nodeName"] == node:
            pytest.skip("both pods were scheduled on one node")

        cluster.kubectl("delete", "node", node, "--wait=false")

        assert_one_restart(api, namespace, uri, survivor)
        st = status(api, namespace, JOB)
        assert st["interruptions"][0]["reason"] in ("NodeDeleted", "DeletionByPodGC")
        assert all(p["spec"].get("nodeName") != node for p in pods(api, namespace, JOB))


def test_preemptions_keep_restarting_and_count_each_incident_once(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    uri = start_with_checkpoint(
        api,
        cluster,
        namespace,
        failurePolicy={"maxFailures": 0, "backoff": {"initialSeconds": 0.5, "maxSeconds": 1}},
        recovery="Cold",
    )
    core = client.CoreV1Api(api)
    for incident in (1, 2, 3):
        wait_running(api, namespace, JOB, attempt=incident, replicas=2)
        # Past the clock-skew margin of the replacement check (observe.REPLACED_AFTER_SECONDS).
        time.sleep(1)
        delete_pod(core, namespace)
        wait_until(
            f"incident {incident} to be seen",
            lambda incident=incident: status(api, namespace, JOB)["preemptions"] == incident,  # type: ignore[misc]
            timeout=60,
        )
    st = wait_running(api, namespace, JOB, attempt=4, replicas=2)
    # maxFailures is 0 and the job still runs: preemptions never spend it.
    assert (st["preemptions"], st["failures"], st["state"]) == (3, 0, "Running")
    for pod in pods(api, namespace, JOB):
        assert env_of(pod)["SPOTRUN_RESUME_FROM"] == uri
