"""Elastic TrainJobs on KWOK GPU nodes: capacity goes, the group shrinks; it returns, it grows.

Three one-GPU nodes, one pod each. A node is deleted and no other has a free GPU: the lost
pod's replacement stays Unschedulable, and after elastic.waitSeconds the survivors go on as
a group of two (same pods, relabelled to a new attempt), `kubectl get trainjobs` shows
SIZE 2/3, and a GroupShrunk event says why. A new node comes: the waiting pod schedules and
the group grows back to 3/3 (GroupGrown). Neither resize spends a budget.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client

from tests.cluster.operator_harness import (
    Operator,
    api,
    create,
    operator,
    pods,
    status,
    temp_nodes,
    trainjob,
    trainjob_crd,
    wait_running,
)
from tests.fixtures.cluster import Cluster, wait_until

FIXTURES = (api, operator, trainjob_crd)
JOB = "elastic"


def uids(api: client.ApiClient, namespace: str) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(api, namespace, JOB)}


def event_reasons(api: client.ApiClient, namespace: str) -> list[str]:
    listed = client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={JOB},involvedObject.kind=TrainJob"
    )
    return [e.reason for e in sorted(listed.items, key=lambda e: e.metadata.creation_timestamp)]


def sized(api: client.ApiClient, namespace: str, size: str, attempt: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = status(api, namespace, JOB)
        ok = st.get("size") == size and st.get("state") == "Running" and st["attempt"] == attempt
        return st if ok else None

    found: dict[str, Any] = wait_until(f"{JOB} Running at size {size}", check, timeout=90)
    return found


def test_lost_capacity_shrinks_the_group_and_returned_capacity_grows_it_back(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    with temp_nodes(cluster, namespace[-12:], count=3, gpus=1) as pool:
        template = {"spec": {"nodeSelector": {"cloud.google.com/gke-spot": "true", **pool}}}
        body = trainjob(
            JOB, replicas=3, template=template, elastic={"minReplicas": 2, "waitSeconds": 3}
        )
        create(api, namespace, body)
        wait_running(api, namespace, JOB, attempt=1, replicas=3)
        before = uids(api, namespace)
        lost = next(p for p in pods(api, namespace, JOB) if p["metadata"]["name"] == f"{JOB}-1")

        cluster.kubectl("delete", "node", lost["spec"]["nodeName"], "--wait=false")

        # Attempt 2 waits for the replacement, which no node can take; attempt 3 goes on.
        st = sized(api, namespace, "2/3", attempt=3)
        assert st["group"] == {
            "attempt": 3,
            "mode": "warm",
            "replicas": 2,
            "kept": [0, 2],
            "members": [0, 2],
            "mtbfSeconds": st["group"]["mtbfSeconds"],
        }
        kinds = [(e["kind"], e["reason"]) for e in st["interruptions"]]
        assert kinds[1:] == [("resize", "CapacityUnavailable")], kinds
        assert (st["preemptions"], st["failures"]) == (1, 0)
        now = uids(api, namespace)
        for name in (f"{JOB}-0", f"{JOB}-2"):
            assert now[name] == before[name]  # the survivors' pods, not new ones
        waiting = next(p for p in pods(api, namespace, JOB) if p["metadata"]["name"] == f"{JOB}-1")
        assert waiting["status"]["phase"] == "Pending"
        table = cluster.kubectl("get", "trainjobs", "-n", namespace).stdout
        header, row = table.splitlines()[:2]
        assert "SIZE" in header.split() and "2/3" in row.split(), table
        assert "GroupShrunk" in event_reasons(api, namespace)

        back = f"{namespace[-12:]}-back"
        try:
            cluster.add_node(back, gpus=1, labels=pool)

            st = sized(api, namespace, "3/3", attempt=4)
            assert st["group"] == {
                "attempt": 4,
                "mode": "warm",
                "replicas": 3,
                "kept": [0, 1, 2],
                "mtbfSeconds": st["group"]["mtbfSeconds"],
            }
            kinds = [(e["kind"], e["reason"]) for e in st["interruptions"]]
            assert kinds[-1] == ("resize", "CapacityReturned"), kinds
            assert (st["preemptions"], st["failures"]) == (1, 0)
            assert all("secondsToRecover" in e for e in st["interruptions"])
            assert uids(api, namespace)[f"{JOB}-1"] == waiting["metadata"]["uid"]  # it joined
            wait_until(
                "a GroupGrown event",
                lambda: "GroupGrown" in event_reasons(api, namespace) or None,
                timeout=30,
            )
        finally:
            cluster.kubectl("delete", "node", back, "--ignore-not-found", "--wait=false")
