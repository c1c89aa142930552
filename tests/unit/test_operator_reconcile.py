"""reconcile_once: the order of writes, once per change, against a recording stand-in for apply.Api.

The pass runs the real observer, policy and builders; only the API writer is replaced, by
an object that records each call and returns what the API server would. This pins what
the cluster tests cannot see directly: the status (the fence) is written before the
StatefulSet changes, and a pass woken again before the watch caught up sends nothing twice.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any, cast

import pytest

from spotrun.ledger.status import peer_report
from spotrun.lifecycle import ledger
from spotrun.lifecycle.group import GroupRecord
from spotrun_operator import children
from spotrun_operator.apply import Api, Conflict
from spotrun_operator.config import Config, Shared
from spotrun_operator.handlers import reconcile
from spotrun_operator.handlers.indexes import slim_pod, slim_statefulset
from spotrun_operator.handlers.reconcile import JobMemory, reconcile_once
from spotrun_operator.observe import NodeFacts

NS, NAME = "team-a", "llama"
KEY = (NS, NAME)
NODES = {"spot-a": [NodeFacts("spot-a")]}


class RecordingApi:
    """Records calls; answers status writes like the API server (merge, resourceVersion + 1)."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.calls: list[tuple[str, Any]] = []
        self.graces: list[int | None] = []
        self.conflict_next = False

    async def read_job(self, namespace: str, name: str) -> dict[str, Any]:
        self.calls.append(("read_job", name))
        return copy.deepcopy(self.job)

    async def write_status(
        self, namespace: str, name: str, resource_version: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        if self.conflict_next or resource_version != self.job["metadata"]["resourceVersion"]:
            self.conflict_next = False
            raise Conflict(name)
        self.calls.append(("write_status", copy.deepcopy(status)))
        merged = {**self.job.get("status", {}), **status}
        self.job["status"] = {k: v for k, v in merged.items() if v is not None}
        self.job["metadata"]["resourceVersion"] = str(int(resource_version) + 1)
        return copy.deepcopy(self.job)

    async def ensure(self, obj: dict[str, Any]) -> None:
        self.calls.append(("ensure", obj["kind"]))

    async def create_statefulset(self, obj: dict[str, Any]) -> None:
        self.calls.append(("create_statefulset", obj))

    async def replace_statefulset_spec(self, obj: dict[str, Any]) -> None:
        self.calls.append(("replace_statefulset_spec", obj))

    async def scale_statefulset(self, namespace: str, name: str, replicas: int) -> None:
        self.calls.append(("scale_statefulset", replicas))

    async def delete_pod(
        self, namespace: str, name: str, uid: str, *, force: bool, grace: int | None = None
    ) -> None:
        self.calls.append(("delete_pod", (name, uid, force)))
        self.graces.append(grace)

    async def label_pod(self, namespace: str, name: str, uid: str, key: str, value: str) -> None:
        self.calls.append(("label_pod", (name, uid, key, value)))

    async def delete_job(self, namespace: str, name: str, uid: str) -> None:
        self.calls.append(("delete_job", name))

    def event(self, job: dict[str, Any], event: Any) -> None:
        self.calls.append(("event", event.reason))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls if c[0] != "event"]


def make_job(recovery: str = "Cold") -> dict[str, Any]:
    """A 2-replica TrainJob; cold recovery unless asked (most tests pin the group restart)."""
    return {
        "apiVersion": "spotrun.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {
            "name": NAME,
            "namespace": NS,
            "uid": "job-uid",
            "generation": 1,
            "resourceVersion": "100",
        },
        "spec": {
            "replicas": 2,
            "trainer": {"image": "img", "function": "a:b"},
            "checkpoint": {"storage": "gs://b/r"},
            "failurePolicy": {"backoff": {"initialSeconds": 0, "maxSeconds": 0, "jitter": 0}},
            "recovery": recovery,
        },
    }


def pod(index: int, attempt: int, *, uid: str, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"{NAME}-{index}",
        "namespace": NS,
        "uid": uid,
        "creationTimestamp": "2020-01-01T00:00:00Z",
        "labels": {
            "spotrun.dev/job": NAME,
            "spotrun.dev/attempt": str(attempt),
            "apps.kubernetes.io/pod-index": str(index),
        },
    }
    if deleting:
        meta["deletionTimestamp"] = "2020-01-01T00:01:00Z"
    return slim_pod(
        {
            "metadata": meta,
            "spec": {"nodeName": "spot-a"},
            "status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {"name": "trainer", "ready": True, "restartCount": 0, "state": {"running": {}}}
                ],
            },
        }
    )


def statefulset(job: dict[str, Any], attempt: int, *, observed: bool = True) -> dict[str, Any]:
    # As the operator wrote it for `attempt`: with the MTBF its status.group recorded.
    record = GroupRecord.from_status(job.get("status") or {})
    mtbf = record.mtbf_seconds if record is not None and record.attempt == attempt else None
    built = children.statefulset(
        job, attempt=attempt, resume_from=None, replicas=2, mtbf_seconds=mtbf
    )
    built["metadata"].update(uid="sts-uid", generation=attempt)
    built["status"] = {"observedGeneration": attempt if observed else attempt - 1}
    return slim_statefulset(built)


class Harness:
    def __init__(self, recovery: str = "Cold") -> None:
        self.api = RecordingApi(make_job(recovery))
        self.shared = Shared(config=Config(metrics_address=""), api=cast(Api, self.api))
        self.memory = JobMemory()
        self.pods: list[dict[str, Any]] = []
        self.sts: dict[str, Any] | None = None

    def run(self, *, live: dict[str, Any] | None = None) -> float:
        body = live if live is not None else copy.deepcopy(self.api.job)
        return asyncio.run(
            reconcile_once(
                shared=self.shared,
                key=KEY,
                body=body,
                pods={KEY: self.pods},
                statefulsets={KEY: [self.sts] if self.sts else []},
                nodes=NODES,
                memory=self.memory,
            )
        )


def test_a_new_job_gets_its_children_status_then_statefulset_once() -> None:
    h = Harness()
    h.run()
    assert h.api.names() == [
        "ensure",
        "ensure",
        "ensure",
        "ensure",
        "write_status",
        "create_statefulset",
    ]
    assert h.api.calls[4][1]["attempt"] == 1
    # Woken again before the watch shows the StatefulSet: nothing is sent twice.
    h.api.calls.clear()
    h.run()
    assert h.api.names() == []


def test_a_stale_copy_of_the_job_does_not_undo_the_last_write() -> None:
    h = Harness()
    stale = copy.deepcopy(h.api.job)  # kopf's copy, before our first status write
    h.run()
    h.api.calls.clear()
    h.run(live=stale)
    assert "write_status" not in h.api.names()


def running_harness(recovery: str = "Cold") -> Harness:
    h = Harness(recovery)
    h.run()
    h.sts = statefulset(h.api.job, 1)
    h.pods = [pod(0, 1, uid="a"), pod(1, 1, uid="b")]
    h.run()
    assert h.api.job["status"]["state"] == "Running"
    h.api.calls.clear()
    return h


def test_a_preemption_writes_the_new_attempt_before_touching_the_statefulset() -> None:
    h = running_harness()
    h.pods = [pod(0, 1, uid="a", deleting=True), pod(1, 1, uid="b")]
    h.run()  # the interruption: Restarting, backoff 0
    h.pods = [pod(1, 1, uid="b")]  # the deleted pod is gone
    h.run()  # the restart
    writes = [c for c in h.api.calls if c[0] in ("write_status", "replace_statefulset_spec")]
    assert [w[0] for w in writes] == ["write_status", "write_status", "replace_statefulset_spec"]
    assert writes[0][1]["state"] == "Restarting" and writes[0][1]["preemptions"] == 1
    assert writes[1][1]["attempt"] == 2
    template = writes[2][1]["spec"]["template"]
    assert template["metadata"]["labels"]["spotrun.dev/attempt"] == "2"
    assert ("event", "GroupRestarted") in h.api.calls

    # Old pods go only once the controller has seen the new template, and only once.
    h.api.calls.clear()
    h.sts = statefulset(h.api.job, 2, observed=False)
    h.run()
    assert "delete_pod" not in h.api.names()
    h.sts = statefulset(h.api.job, 2)
    h.run()
    h.run()
    assert [c for c in h.api.calls if c[0] == "delete_pod"] == [
        ("delete_pod", (f"{NAME}-1", "b", False))
    ]
    # Fenced out by the new attempt: a short grace, so its name is free for the new pod.
    assert h.api.graces == [1]


def test_a_warm_recovery_keeps_the_surviving_pod_and_relabels_it() -> None:
    h = running_harness(recovery="Warm")
    h.pods = [pod(0, 1, uid="a", deleting=True), pod(1, 1, uid="b")]
    h.run()  # the preemption: replica 0's pod is going (it got the notice)
    h.pods = [pod(1, 1, uid="b")]
    h.run()  # the restart: attempt 2, keeping replica 1
    assert h.api.job["status"]["group"] == {
        "attempt": 2,
        "mode": "warm",
        "replicas": 2,
        "kept": [1],
        "mtbfSeconds": 1.0,  # one preemption in the job's first second
    }
    template = [c for c in h.api.calls if c[0] == "replace_statefulset_spec"][-1][1]
    env = {
        e["name"]: e.get("value")
        for e in template["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert (env["SPOTRUN_ATTEMPT"], env["MASTER_PORT"], env["SPOTRUN_RECOVERY"]) == (
        "2",
        "29502",
        "warm",
    )
    # The replacement's checkpoint cadences assume the job's observed MTBF.
    assert env["SPOTRUN_OBSERVED_MTBF_SECONDS"] == "1"
    h.sts = statefulset(h.api.job, 2)
    h.run()
    # The survivor is not deleted: it joins attempt 2 where it stands (same UID).
    assert "delete_pod" not in h.api.names()
    assert ("label_pod", (f"{NAME}-1", "b", "spotrun.dev/attempt", "2")) in h.api.calls


def waiting(body: dict[str, Any]) -> dict[str, Any]:
    """`body` as its kubelet still sets it up: pending, the trainer container not started."""
    body["status"] = {
        "phase": "Pending",
        "conditions": [],
        "containerStatuses": [
            {
                "name": "trainer",
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}},
                "lastState": {},
            }
        ],
    }
    return body


def test_a_stand_in_for_a_lost_pod_goes_at_once_and_a_running_pod_gets_a_short_grace() -> None:
    h = running_harness(recovery="Warm")
    h.pods = [pod(0, 1, uid="a", deleting=True), pod(1, 1, uid="b")]
    h.run()  # the preemption of replica 0
    # The StatefulSet controller made a stand-in for pod 0 from attempt 1's template.
    stand_in = waiting(pod(0, 1, uid="c"))
    h.pods = [stand_in, pod(1, 1, uid="b")]
    h.run()  # the restart: attempt 2, keeping replica 1
    h.sts = statefulset(h.api.job, 2)
    h.run()
    assert [c for c in h.api.calls if c[0] == "delete_pod"] == [
        ("delete_pod", (f"{NAME}-0", "c", False))
    ]
    # Its trainer never ran: no grace, so attempt 2's pod can take the name at once.
    assert h.api.graces == [0]

    # Once its trainer has run (even if it ended), it gets the short grace of fenced pods.
    assert not reconcile._trainer_never_ran(pod(0, 1, uid="d"))  # running and ready
    for state in ({"running": {}}, {"terminated": {"exitCode": 137}}):
        started = waiting(pod(0, 1, uid="d"))
        started["status"]["containerStatuses"][0]["state"] = state
        assert not reconcile._trainer_never_ran(started)
    restarted = waiting(pod(0, 1, uid="e"))
    restarted["status"]["containerStatuses"][0]["restartCount"] = 1
    assert not reconcile._trainer_never_ran(restarted)
    assert reconcile._trainer_never_ran({"metadata": {}, "status": {"phase": "Pending"}})


def test_pods_on_a_deleted_node_are_force_deleted() -> None:
    h = running_harness()
    h.run()
    gone = pod(0, 1, uid="a")
    gone["spec"]["nodeName"] = "deleted-node"
    h.pods = [gone, pod(1, 1, uid="b")]
    h.run()  # interruption (NodeDeleted)
    h.run()  # restart: attempt 2 written, template patched
    h.sts = statefulset(h.api.job, 2)
    h.run()
    deletions = sorted(c[1] for c in h.api.calls if c[0] == "delete_pod")
    assert deletions == [(f"{NAME}-0", "a", True), (f"{NAME}-1", "b", False)]


def test_a_member_reported_silent_is_force_deleted_when_its_kubelet_never_confirms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = running_harness(recovery="Warm")
    # Replica 1 heard nothing from node rank 0: its pod runs as far as Kubernetes can tell.
    h.api.job["status"]["peerReports"] = {"1": peer_report(1, [0], 0.0)}
    h.api.job["metadata"]["resourceVersion"] = "200"
    h.run()  # the interruption: PeerUnresponsive
    h.run()  # the restart, warm, keeping replica 1
    (entry,) = h.api.job["status"]["interruptions"]
    assert (entry["reason"], entry["recovery"], entry["unresponsive"]) == (
        "PeerUnresponsive",
        "warm",
        [0],
    ), entry
    h.sts = statefulset(h.api.job, 2)
    h.api.calls.clear()
    h.run()
    # Asked gracefully first: a kubelet that answers tears the pod down itself.
    assert [c for c in h.api.calls if c[0] == "delete_pod"] == [
        ("delete_pod", (f"{NAME}-0", "a", False))
    ]
    # Its kubelet does not confirm (the node is gone): the next pass is due within the wait,
    # and nothing is forced before it.
    h.pods = [pod(0, 1, uid="a", deleting=True), pod(1, 2, uid="b")]
    h.api.calls.clear()
    due = h.run()
    assert due <= time.time() + reconcile.SILENT_POD_FORCE_AFTER_SECONDS
    assert "delete_pod" not in h.api.names()
    # Past the wait: forced (once), so the pod that takes its name can be created.
    h.memory.silent_going = {u: t - 60 for u, t in h.memory.silent_going.items()}
    h.run()
    h.run()
    assert [c for c in h.api.calls if c[0] == "delete_pod"] == [
        ("delete_pod", (f"{NAME}-0", "a", True))
    ]


def test_a_going_pod_that_nobody_reported_silent_waits_for_its_kubelet() -> None:
    h = running_harness(recovery="Warm")
    h.pods = [pod(0, 1, uid="a", deleting=True), pod(1, 1, uid="b")]
    h.run()  # the preemption of replica 0 (a notice: its pod is going)
    h.run()  # the restart, warm, keeping replica 1
    assert "unresponsive" not in h.api.job["status"]["interruptions"][0]
    h.sts = statefulset(h.api.job, 2)
    h.pods = [pod(0, 1, uid="a", deleting=True), pod(1, 2, uid="b")]
    h.memory.silent_going = {"a": time.monotonic() - 60}  # as if seen going long ago
    h.api.calls.clear()
    h.run()
    assert "delete_pod" not in h.api.names()


def test_the_silent_members_of_a_ledger_entry_are_read_strictly() -> None:
    entries = [
        {"attempt": 1, "unresponsive": [0, 2]},
        {"attempt": 2, "unresponsive": [1]},
        {"attempt": 1, "unresponsive": ["3", -1, True, 4.0, 5]},
        {"attempt": 1, "unresponsive": "0"},
        {"attempt": "1", "unresponsive": [6]},
    ]
    assert ledger.unresponsive(entries, 1) == {0, 2, 5}
    assert ledger.unresponsive(entries, 2) == {1}
    assert ledger.unresponsive(entries, 3) == frozenset()


def test_a_conflict_surfaces_so_the_loop_rereads() -> None:
    h = Harness()
    h.api.conflict_next = True
    with pytest.raises(Conflict):
        h.run()
    assert "create_statefulset" not in h.api.names()
