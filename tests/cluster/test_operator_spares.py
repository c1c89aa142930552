"""Warm spares (spec.spares) on KWOK GPU nodes: a waiting pod takes a lost member's place.

Three one-GPU nodes for a job of two replicas and one spare: the StatefulSet runs three
pods, and pod 2 waits outside the group. A member's node is deleted: the group re-forms at
once with the spare in the lost member's place (same pods, relabelled to the new attempt;
status.group.members), the job stays at SIZE 2/2 without waiting for any replacement, and
the lost pod's replacement, once a node can take it, waits as the next spare.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client

from tests.cluster.operator_harness import (
    Operator,
    api,
    create,
    operator,
    patch_spec,
    pods,
    status,
    temp_nodes,
    trainjob,
    trainjob_crd,
    wait_running,
)
from tests.fixtures.cluster import Cluster, wait_until

FIXTURES = (api, operator, trainjob_crd)
JOB = "spares"


def by_name(api: client.ApiClient, namespace: str) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in pods(api, namespace, JOB)}


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def test_a_waiting_spare_takes_the_lost_members_place_at_once(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    with temp_nodes(cluster, f"sp{namespace[-6:]}", count=3, gpus=1) as pool:
        template = {"spec": {"nodeSelector": {"cloud.google.com/gke-spot": "true", **pool}}}
        create(api, namespace, trainjob(JOB, replicas=2, template=template, spares=1))
        # Three pods of attempt 1 run; the group is pods 0 and 1.
        first = wait_running(api, namespace, JOB, attempt=1, replicas=3)
        assert first["size"] == "2/2" and "members" not in first["group"], first["group"]
        before = by_name(api, namespace)
        env = env_of(before[f"{JOB}-2"])
        assert env["SPOTRUN_SPARES"] == "1" and "{index}" in env["SPOTRUN_MEMBER_ADDR"], env

        cluster.kubectl("delete", "node", before[f"{JOB}-1"]["spec"]["nodeName"], "--wait=false")

        # Attempt 2 runs with the spare as node rank 1: no replacement is waited for.
        st = wait_running(api, namespace, JOB, attempt=2, replicas=2)
        assert st["group"] == {
            "attempt": 2,
            "mode": "warm",
            "replicas": 2,
            "kept": [0, 2],
            "members": [0, 2],
            "mtbfSeconds": st["group"]["mtbfSeconds"],  # one preemption since the start
        }, st["group"]
        assert (st["size"], st["readyReplicas"]) == ("2/2", 2)
        assert (st["preemptions"], st["failures"]) == (1, 0)
        (entry,) = st["interruptions"]
        assert (entry["kind"], entry["recovery"]) == ("preemption", "warm"), entry
        now = by_name(api, namespace)
        for name in (f"{JOB}-0", f"{JOB}-2"):
            assert now[name]["metadata"]["uid"] == before[name]["metadata"]["uid"]  # kept
        # The lost member's replacement cannot be scheduled (no free GPU): it is the next
        # spare, and the group does not wait for it.
        replacement = wait_until(
            "the replacement of pod 1",
            lambda: (
                pod
                if (pod := by_name(api, namespace).get(f"{JOB}-1")) is not None
                and pod["metadata"]["uid"] != before[f"{JOB}-1"]["metadata"]["uid"]
                else None
            ),
            timeout=60,
        )
        assert replacement["status"]["phase"] == "Pending"
        assert status(api, namespace, JOB)["state"] == "Running"

        back = f"sp{namespace[-6:]}-back"
        try:
            cluster.add_node(back, gpus=1, labels=pool)
            # It runs, outside the group: the job stays as it is.
            wait_running(api, namespace, JOB, attempt=2, replicas=3)
            st = status(api, namespace, JOB)
            assert st["attempt"] == 2 and st["group"]["members"] == [0, 2], st["group"]
            assert len(st["interruptions"]) == 1
        finally:
            cluster.kubectl("delete", "node", back, "--ignore-not-found", "--wait=false")


def statefulset_replicas(api: client.ApiClient, namespace: str) -> int:
    sts = client.AppsV1Api(api).read_namespaced_stateful_set(JOB, namespace)
    return int(sts.spec.replicas)


def test_spares_raised_and_lowered_on_a_running_job_move_only_the_pods_beside_the_group(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    """spec.spares 0 -> 1 on a running job adds a spare pod of the same attempt (no
    restart); after the spare took lost pod 0's place (rank 0 moved), spec.spares -> 0
    hands member 2's place back to pod 0 (a warm resize, SparesLowered) and the
    StatefulSet shrinks to the group's two pods."""
    with temp_nodes(cluster, f"sq{namespace[-6:]}", count=4, gpus=1) as pool:
        template = {"spec": {"nodeSelector": {"cloud.google.com/gke-spot": "true", **pool}}}
        create(api, namespace, trainjob(JOB, replicas=2, template=template))
        wait_running(api, namespace, JOB, attempt=1, replicas=2)
        before = by_name(api, namespace)
        assert "SPOTRUN_SPARES" not in env_of(before[f"{JOB}-0"])

        patch_spec(api, namespace, JOB, {"spares": 1})
        st = wait_running(api, namespace, JOB, attempt=1, replicas=3)
        assert statefulset_replicas(api, namespace) == 3
        raised = by_name(api, namespace)
        assert env_of(raised[f"{JOB}-2"])["SPOTRUN_SPARES"] == "1"
        for name in (f"{JOB}-0", f"{JOB}-1"):  # the group was not touched
            assert raised[name]["metadata"]["uid"] == before[name]["metadata"]["uid"]
        assert st["attempt"] == 1 and not st.get("interruptions"), st
        wait_until(
            "status.spares 1/1",
            lambda: status(api, namespace, JOB).get("spares") == "1/1",
            timeout=30,
        )

        cluster.kubectl("delete", "node", raised[f"{JOB}-0"]["spec"]["nodeName"], "--wait=false")
        st = wait_running(api, namespace, JOB, attempt=2, replicas=3)  # pod 0 back, as the spare
        assert st["group"]["members"] == [2, 1], st["group"]
        promoted = by_name(api, namespace)

        patch_spec(api, namespace, JOB, {"spares": 0})
        st = wait_running(api, namespace, JOB, attempt=3, replicas=2)
        assert "members" not in st["group"] and st["size"] == "2/2", st["group"]
        entry = st["interruptions"][-1]
        assert (entry["kind"], entry["reason"]) == ("resize", "SparesLowered"), entry
        assert (st["preemptions"], st["failures"]) == (1, 0)
        wait_until(
            "the StatefulSet at 2 pods and pod 2 gone",
            lambda: (
                statefulset_replicas(api, namespace) == 2
                and f"{JOB}-2" not in by_name(api, namespace)
            ),
            timeout=60,
        )
        now = by_name(api, namespace)
        for name in (f"{JOB}-0", f"{JOB}-1"):  # kept in place through the resize
            assert now[name]["metadata"]["uid"] == promoted[name]["metadata"]["uid"]
