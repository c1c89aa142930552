"""A member its peers report silent (status.peerReports) is replaced at once, on the real
API server, with the report written as a pod's launcher writes it: by the runtime's kube sink
(a merge patch) with the job's own ServiceAccount token.

Its pod still runs as far as Kubernetes can tell (a node that lost its network, a frozen
machine): without the report the operator would wait for the node to go NotReady. With it,
the group restarts warm without that member (reason PeerUnresponsive), the two survivors
keep their pods (same UIDs), and only the silent member's pod is replaced.
"""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client

from tests.cluster.operator_harness import (
    Operator,
    api,
    create,
    operator,
    pods,
    runtime_sink,
    status,
    trainjob,
    trainjob_crd,
    wait_running,
)
from tests.fixtures.cluster import Cluster, wait_until

FIXTURES = (api, operator, trainjob_crd)
JOB = "silent"


def uids(api: client.ApiClient, namespace: str) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(api, namespace, JOB)}


def test_a_member_reported_silent_is_replaced_and_the_reporters_keep_their_pods(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    create(api, namespace, trainjob(JOB, replicas=3))
    wait_running(api, namespace, JOB, attempt=1, replicas=3)
    before = uids(api, namespace)

    # A report of an older attempt counts for nothing, and is kept beside the others.
    runtime_sink(cluster, api, namespace, JOB, attempt=0).peers_lost(0, [2], time.time())
    # Members 0 and 1 heard nothing from node rank 2; each writes its own entry.
    for by in (0, 1):
        runtime_sink(cluster, api, namespace, JOB, attempt=1).peers_lost(by, [2], time.time())

    st = wait_running(api, namespace, JOB, attempt=2, replicas=3)
    assert set(st["peerReports"]) == {"0", "1"}, st["peerReports"]
    assert st["peerReports"]["1"]["nodes"] == [2]
    (entry,) = st["interruptions"]
    assert (entry["kind"], entry["reason"], entry["recovery"]) == (
        "preemption",
        "PeerUnresponsive",
        "warm",
    ), entry
    assert "replica 2 (PeerUnresponsive)" in entry["message"], entry
    assert (st["preemptions"], st["failures"]) == (1, 0)
    assert st["group"]["kept"] == [0, 1], st["group"]

    def replaced() -> dict[str, str] | None:
        now = uids(api, namespace)
        return now if len(now) == 3 and now[f"{JOB}-2"] != before[f"{JOB}-2"] else None

    now = wait_until("the silent member's pod replaced", replaced)
    for name in (f"{JOB}-0", f"{JOB}-1"):
        assert now[name] == before[name], name  # kept: the same pods
    # Nothing more happens: the reports name attempt 1, and the group is attempt 2 now.
    time.sleep(3)
    later: dict[str, Any] = status(api, namespace, JOB)
    assert (later["attempt"], later["preemptions"]) == (2, 1), later


def test_a_silent_member_whose_kubelet_never_confirms_its_deletion_is_force_deleted(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    """A node gone without notice: its node stays Ready for a while (the node controller's
    grace), and no kubelet confirms the graceful deletion of its pod. KWOK plays that
    kubelet: the annotation makes it confirm after an hour. The StatefulSet creates the
    replacement only once the old pod is gone, so the operator forces it."""
    create(api, namespace, trainjob(JOB, replicas=2))
    wait_running(api, namespace, JOB, attempt=1, replicas=2)
    before = uids(api, namespace)
    client.CoreV1Api(api).patch_namespaced_pod(
        f"{JOB}-1",
        namespace,
        {"metadata": {"annotations": {"pod-delete.stage.kwok.x-k8s.io/delay": "1h"}}},
    )
    runtime_sink(cluster, api, namespace, JOB, attempt=1).peers_lost(0, [1], time.time())

    def replaced() -> dict[str, str] | None:
        now = uids(api, namespace)
        return now if len(now) == 2 and now.get(f"{JOB}-1") != before[f"{JOB}-1"] else None

    now = wait_until("the silent member's pod forced out and replaced", replaced, timeout=60)
    assert now[f"{JOB}-0"] == before[f"{JOB}-0"]  # the reporter kept its pod
    st = wait_running(api, namespace, JOB, attempt=2, replicas=2)
    (entry,) = st["interruptions"]
    assert (entry["reason"], entry["recovery"], entry["unresponsive"]) == (
        "PeerUnresponsive",
        "warm",
        [1],
    ), entry


def test_a_report_about_the_reporter_itself_or_from_outside_the_group_restarts_nothing(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    create(api, namespace, trainjob(JOB, replicas=2))
    wait_running(api, namespace, JOB, attempt=1, replicas=2)
    sink = runtime_sink(cluster, api, namespace, JOB, attempt=1)
    sink.peers_lost(1, [1], time.time())  # about itself
    sink.peers_lost(5, [0], time.time())  # not a member
    time.sleep(3)
    st = status(api, namespace, JOB)
    assert set(st["peerReports"]) == {"1", "5"}, st["peerReports"]
    assert (st["attempt"], st["state"], st["preemptions"]) == (1, "Running", 0), st
