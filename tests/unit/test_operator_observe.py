"""observe: Kubernetes' signals (pods, nodes) become the policy's facts; tables of real shapes.

The pod dicts follow what the API server returns (and the slim copies the operator's
indexes keep): a preemption is told from the signals of DESIGN.md section 4, an
application failure is left as exit code, reason and restarts for the classifier.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from spotrun.lifecycle import JobSpec, Observation, RestartGroup, classify, format_time, plan
from spotrun_operator import observe
from spotrun_operator.handlers.indexes import slim_pod
from spotrun_operator.observe import NodeFacts, SeenPods

T0 = 1_700_000_000.0
JOB = "llama"
NS = "team-a"
NODE = "spot-a"
HEALTHY = {NODE: NodeFacts(NODE), "spot-b": NodeFacts("spot-b")}


def make_pod(
    index: int = 0,
    attempt: int | None = 1,
    phase: str = "Running",
    *,
    node: str | None = NODE,
    ready: bool = True,
    uid: str | None = None,
    created: float = T0,
    deleting: bool = False,
    grace: int = 30,
    conditions: list[dict[str, Any]] | None = None,
    container: dict[str, Any] | None = None,
    reason: str | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """A pod of the job's StatefulSet as the API server returns it (trimmed of noise)."""
    labels = {
        "spotrun.dev/job": JOB,
        "apps.kubernetes.io/pod-index": str(index),
        "controller-revision-hash": f"{JOB}-5d8f7c9b4",
        "statefulset.kubernetes.io/pod-name": f"{JOB}-{index}",
    }
    if attempt is not None:
        labels["spotrun.dev/attempt"] = str(attempt)
    meta: dict[str, Any] = {
        "name": f"{JOB}-{index}",
        "namespace": NS,
        "uid": uid or f"uid-{index}-{attempt}",
        "labels": labels,
        "creationTimestamp": format_time(created).replace(".000", ""),
        "ownerReferences": [{"kind": "StatefulSet", "name": JOB, "controller": True}],
    }
    if deleting:
        meta["deletionTimestamp"] = format_time(created + 60)
        meta["deletionGracePeriodSeconds"] = grace
    conds = [
        {"type": "PodReadyToStartContainers", "status": "True"},
        {"type": "Initialized", "status": "True"},
        {"type": "Ready", "status": "True" if ready else "False"},
        {"type": "ContainersReady", "status": "True" if ready else "False"},
        {"type": "PodScheduled", "status": "True"},
        *(conditions or []),
    ]
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conds,
        "hostIP": "10.0.0.7",
        "podIP": "10.4.0.12",
        "containerStatuses": [
            container
            or {
                "name": "trainer",
                "image": "ghcr.io/acme/train:1",
                "ready": ready,
                "restartCount": 0,
                "started": True,
                "state": {"running": {"startedAt": format_time(created + 5)}},
            }
        ],
    }
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "trainer"}]},
        "status": status,
    }
    if node:
        pod["spec"]["nodeName"] = node
    return pod


def terminated(
    exit_code: int, reason: str, restarts: int = 1, *, current: bool = False
) -> dict[str, Any]:
    """A trainer container status after a non-zero exit (restarted in place, or not yet)."""
    term = {"exitCode": exit_code, "reason": reason, "startedAt": "x", "finishedAt": "y"}
    if current:
        state: dict[str, Any] = {"terminated": term}
        last: dict[str, Any] = {}
    else:
        state = {"running": {"startedAt": "z"}}
        last = {"terminated": term}
    return {
        "name": "trainer",
        "ready": False,
        "restartCount": restarts,
        "state": state,
        "lastState": last,
    }


def disruption(reason: str) -> dict[str, Any]:
    return {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": reason,
        "message": f"{reason}: the pod is being removed",
    }


def see(pod: dict[str, Any], **kwargs: Any) -> Any:
    kwargs.setdefault("nodes", HEALTHY)
    kwargs.setdefault("current_attempt", 1)
    return observe.replica(pod, **kwargs)


# -- preemption signals ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pod", "nodes", "reason"),
    [
        pytest.param(
            make_pod(conditions=[disruption("EvictionByEvictionAPI")], deleting=True),
            HEALTHY,
            "EvictionByEvictionAPI",
            id="evicted-through-the-eviction-api",
        ),
        pytest.param(
            make_pod(conditions=[disruption("PreemptionByScheduler")]),
            HEALTHY,
            "PreemptionByScheduler",
            id="preempted-by-a-higher-priority-pod",
        ),
        pytest.param(
            make_pod(conditions=[disruption("DeletionByTaintManager")], deleting=True),
            HEALTHY,
            "DeletionByTaintManager",
            id="taint-manager-eviction",
        ),
        pytest.param(
            make_pod(
                phase="Failed",
                conditions=[disruption("TerminationByKubelet")],
                reason="Terminated",
                ready=False,
            ),
            HEALTHY,
            "TerminationByKubelet",
            id="kubelet-terminated-it-for-node-shutdown",
        ),
        pytest.param(
            make_pod(conditions=[disruption("DeletionByPodGC")], deleting=True),
            {},
            "DeletionByPodGC",
            id="pod-gc-after-node-deleted",
        ),
        pytest.param(
            make_pod(
                phase="Failed",
                reason="Shutdown",
                message="Pod was terminated in response to imminent node shutdown.",
                ready=False,
            ),
            HEALTHY,
            "Shutdown",
            id="graceful-node-shutdown",
        ),
        pytest.param(
            make_pod(phase="Failed", reason="NodeShutdown", ready=False),
            HEALTHY,
            "NodeShutdown",
            id="node-shutdown-reason",
        ),
        pytest.param(
            make_pod(phase="Failed", reason="Terminated", ready=False),
            HEALTHY,
            "Terminated",
            id="terminated-reason",
        ),
        pytest.param(make_pod(), {}, "NodeDeleted", id="node-deleted"),
        pytest.param(
            make_pod(),
            {NODE: NodeFacts(NODE, observe.NODE_NOT_READY)},
            "NodeNotReady",
            id="node-not-ready",
        ),
        pytest.param(
            make_pod(),
            {NODE: NodeFacts(NODE, observe.NODE_UNREACHABLE)},
            "NodeUnreachable",
            id="node-unreachable",
        ),
        pytest.param(
            make_pod(),
            {NODE: NodeFacts(NODE, observe.NODE_TERMINATING)},
            "NodeTerminating",
            id="gke-impending-node-termination",
        ),
        pytest.param(make_pod(phase="Unknown"), HEALTHY, "PodLost", id="pod-phase-unknown"),
        pytest.param(make_pod(deleting=True), HEALTHY, "PodDeleted", id="deleted-by-someone-else"),
        pytest.param(
            make_pod(deleting=True, grace=0), HEALTHY, "PodForceDeleted", id="force-deleted"
        ),
    ],
)
def test_preemption_signals(pod: dict[str, Any], nodes: dict[str, NodeFacts], reason: str) -> None:
    seen = see(pod, nodes=nodes)
    assert seen.preempted
    assert seen.preemption_reason == reason
    # The slim copy the operator indexes must tell the same story.
    assert see(slim_pod(pod), nodes=nodes) == seen


@pytest.mark.parametrize(
    "nodes", [{}, {NODE: NodeFacts(NODE, observe.NODE_NOT_READY)}], ids=["deleted", "not-ready"]
)
def test_a_pod_on_a_lost_node_is_reported_failed_so_nobody_waits_for_it_to_drain(
    nodes: dict[str, NodeFacts],
) -> None:
    seen = see(make_pod(), nodes=nodes)
    assert (seen.preempted, seen.phase) == (True, "failed")


def test_a_force_deleted_pod_is_reported_failed_so_nobody_waits_for_a_final_checkpoint() -> None:
    """`kubectl delete --grace-period=0 --force`: one update (timestamp, grace 0), then the
    pod's removal. Its processes get no notice to checkpoint under; a graceful deletion
    still does."""
    forced = see(make_pod(deleting=True, grace=0))
    assert (forced.preempted, forced.phase, forced.preemption_reason) == (
        True,
        "failed",
        "PodForceDeleted",
    )
    graceful = see(make_pod(deleting=True, grace=1))
    assert (graceful.preempted, graceful.phase, graceful.deleting) == (True, "running", True)


@pytest.mark.parametrize(
    ("grace", "restarts"), [(0, True), (30, False)], ids=["forced", "graceful"]
)
def test_a_force_deleted_member_is_replaced_at_once_and_the_survivor_kept(
    grace: int, restarts: bool
) -> None:
    """What the policy makes of it: a forced deletion restarts the group warm in the same
    pass; a graceful one waits for the member's final checkpoint."""
    spec = JobSpec(replicas=2)
    status = plan(spec, {}, Observation(T0, ())).status
    pods = [make_pod(0), make_pod(1)]
    status = plan(spec, status, observe.observe(job(**status), pods, HEALTHY, now=T0)).status
    pods[1] = make_pod(1, deleting=True, grace=grace)
    observation = observe.observe(job(**status), pods, HEALTHY, now=T0 + 50)
    actions = plan(spec, status, observation).actions
    restart = [a for a in actions if isinstance(a, RestartGroup)]
    if restarts:
        assert [a.keep for a in restart] == [(0,)], actions
    else:
        assert restart == [], actions


def test_an_evicted_pod_still_running_its_grace_period_is_reported_running() -> None:
    seen = see(make_pod(conditions=[disruption("EvictionByEvictionAPI")], deleting=True))
    assert (seen.preempted, seen.phase, seen.deleting) == (True, "running", True)


def test_a_pod_replaced_behind_our_back_is_a_preemption() -> None:
    seen_pods = SeenPods()
    seen_pods.remember(1, [(0, "uid-original")])
    replacement = make_pod(uid="uid-new")
    found = see(replacement, seen=seen_pods)
    assert (found.preempted, found.preemption_reason, found.replaced) == (
        True,
        "PodReplaced",
        True,
    )
    original = see(make_pod(uid="uid-original"), seen=seen_pods)
    assert not original.preempted and not original.replaced
    # A pod still in its grace period is not a replacement: it has the notice.
    assert not see(make_pod(uid="uid-original", deleting=True), seen=seen_pods).replaced


def test_after_an_operator_restart_a_pod_created_after_the_attempt_ran_is_a_replacement() -> None:
    replacement = make_pod(created=T0 + 600)
    found = see(replacement, running_since=T0 + 30)
    assert found.preemption_reason == "PodReplaced"
    # Within the clock-skew margin, no verdict: the original pods are that young.
    assert not see(make_pod(created=T0 + 32), running_since=T0 + 30).preempted


def test_the_replacement_of_a_pod_that_said_why_it_went_carries_the_reason() -> None:
    # The watch handler kept what the lost pod said (direct_evidence); its replacement's
    # own status says nothing, whether or not this process saw the original's UID.
    said = {(1, 0): "TerminationByKubelet"}
    for pod in (make_pod(0, phase="Pending", uid="uid-new"), make_pod(0, uid="uid-new")):
        found = see(pod, evidence=said)
        assert (found.preempted, found.preemption_reason, found.replaced) == (
            True,
            "TerminationByKubelet",
            True,
        )
    # Another replica, or the same index in another attempt, is not touched.
    assert not see(make_pod(1), evidence=said).preempted
    assert not see(make_pod(0, attempt=2), current_attempt=2, evidence=said).preempted
    # A pod that says it itself keeps its own reason.
    own = see(make_pod(0, conditions=[disruption("EvictionByEvictionAPI")]), evidence=said)
    assert (own.preemption_reason, own.replaced) == ("EvictionByEvictionAPI", False)


def test_a_replica_gone_after_saying_why_is_lost_for_that_reason_not_vanished() -> None:
    # kopf drops a deleted pod from its index before the watch handler keeps what it said,
    # so a pass sees the replica missing; once the evidence is in, it names the loss, also
    # for the attempt just restarted (the ledger is refined until the new attempt runs).
    said = {(1, 0): "TerminationByKubelet"}
    before = observe.observe(job(attempt=1), [make_pod(1)], HEALTHY, now=T0)
    verdict = classify(before.of_attempt(1), expected=2, was_running=True, now=T0)
    assert verdict is not None and verdict.reason == "Vanished"
    after = observe.observe(job(attempt=1), [make_pod(1)], HEALTHY, now=T0, evidence=said)
    gone = after.of_attempt(1)[0]
    assert (gone.index, gone.phase, gone.preempted, gone.present) == (0, "missing", True, False)
    verdict = classify(after.of_attempt(1), expected=2, was_running=True, now=T0)
    assert verdict is not None
    assert (verdict.reason, verdict.replicas) == ("TerminationByKubelet", (0,))
    assert verdict.message == "lost replica 0 (TerminationByKubelet)"
    restarted = observe.observe(
        job(attempt=2), [make_pod(1, attempt=2)], HEALTHY, now=T0, evidence=said
    )
    assert [(r.attempt, r.index, r.preempted) for r in restarted.replicas] == [
        (2, 1, False),
        (1, 0, True),
    ]
    assert restarted.stale(2) == ()
    # While a pod of that replica and attempt exists, it is the one observed.
    replaced = observe.observe(
        job(attempt=1),
        [make_pod(0, phase="Pending", uid="n"), make_pod(1)],
        HEALTHY,
        now=T0,
        evidence=said,
    )
    assert [r.index for r in replaced.replicas] == [0, 1]


def test_evidence_is_kept_for_the_current_and_the_last_restarted_attempt() -> None:
    said = {(1, 0): "TerminationByKubelet", (2, 1): "EvictionByEvictionAPI", (3, 0): "Shutdown"}
    observe.forget_evidence(said, 3)
    assert said == {(2, 1): "EvictionByEvictionAPI", (3, 0): "Shutdown"}
    observe.forget_evidence(said, 4)
    assert said == {(3, 0): "Shutdown"}


def test_pods_of_an_older_attempt_being_deleted_are_not_a_preemption() -> None:
    old = make_pod(attempt=1, deleting=True)
    assert not see(old, current_attempt=2).preempted


# -- application failures -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("container", "phase", "kind", "reason"),
    [
        pytest.param(
            terminated(137, "OOMKilled"), "Running", "failure", "OOMKilled", id="oom-killed"
        ),
        pytest.param(terminated(1, "Error"), "Running", "failure", "Error", id="non-zero-exit"),
        pytest.param(
            terminated(1, "Error", restarts=4)
            | {"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}}},
            "Running",
            "failure",
            "Error",
            id="crash-loop-back-off",
        ),
        pytest.param(
            terminated(75, "Error", restarts=1),
            "Running",
            "preemption",
            "PreemptionNotice",
            id="exit-75-honoured-a-preemption-notice",
        ),
    ],
)
def test_application_failures_are_classified_by_the_policy(
    container: dict[str, Any], phase: str, kind: str, reason: str
) -> None:
    pods = [make_pod(0, container=container, phase=phase, ready=False), make_pod(1)]
    replicas = [see(p) for p in pods]
    assert not replicas[0].preempted
    verdict = classify(replicas, expected=2, was_running=True, now=T0)
    assert verdict is not None
    assert (verdict.kind, verdict.reason, verdict.replicas) == (kind, reason, (0,))


def test_a_restart_count_and_last_exit_survive_the_container_restarting_in_place() -> None:
    seen = see(make_pod(container=terminated(137, "OOMKilled", restarts=2)))
    assert (seen.restarts, seen.exit_code, seen.reason, seen.phase) == (
        2,
        137,
        "OOMKilled",
        "running",
    )


def test_unschedulable_and_image_pull_errors_are_waiting_reasons_not_failures() -> None:
    unschedulable = make_pod(phase="Pending", node=None, ready=False)
    unschedulable["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }
    ]
    unschedulable["status"].pop("containerStatuses")
    pulling = make_pod(
        phase="Pending",
        ready=False,
        container={
            "name": "trainer",
            "ready": False,
            "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}},
        },
    )
    a, b = see(unschedulable), see(pulling)
    assert (a.waiting_reason, a.preempted) == ("Unschedulable", False)
    assert "Insufficient nvidia.com/gpu" in str(a.message)
    assert (b.waiting_reason, b.preempted) == ("ImagePullBackOff", False)
    assert classify([a, b], expected=2, was_running=False, now=T0) is None


# -- nodes ---------------------------------------------------------------------------------


def make_node(ready: str = "True", taints: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "metadata": {"name": NODE, "labels": {"cloud.google.com/gke-spot": "true"}},
        "spec": {"taints": [{"key": t, "effect": "NoSchedule"} for t in taints]},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": ready, "reason": "KubeletReady"},
            ]
        },
    }


@pytest.mark.parametrize(
    ("node", "lost"),
    [
        (make_node(), None),
        (make_node(ready="False"), "NodeNotReady"),
        (make_node(ready="Unknown", taints=["node.kubernetes.io/unreachable"]), "NodeUnreachable"),
        (make_node(taints=["cloud.google.com/impending-node-termination"]), "NodeTerminating"),
        (make_node(taints=["node.kubernetes.io/out-of-service"]), "NodeTerminating"),
        (make_node(taints=["nvidia.com/gpu"]), None),
    ],
)
def test_node_facts(node: dict[str, Any], lost: str | None) -> None:
    assert observe.node_facts(node) == NodeFacts(NODE, lost)


# -- the whole observation ---------------------------------------------------------------------


def job(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": JOB, "namespace": NS, "generation": 3},
        "spec": {"replicas": 2, "suspend": False},
        "status": status,
    }


def test_completion_counts_only_for_the_current_attempt() -> None:
    pods = [make_pod(0, attempt=2), make_pod(1, attempt=2)]
    done = observe.observe(
        job(attempt=2, completion={"attempt": 2, "step": 9}), pods, HEALTHY, now=T0
    )
    stale = observe.observe(
        job(attempt=2, completion={"attempt": 1, "step": 9}), pods, HEALTHY, now=T0
    )
    assert done.completed and not stale.completed
    assert done.generation == 3
    assert [r.index for r in done.of_attempt(2)] == [0, 1]


def test_last_progress_time_comes_from_last_metrics() -> None:
    seen = observe.observe(
        job(attempt=1, lastMetrics={"step": 5, "time": "2023-11-14T22:13:30Z"}), [], HEALTHY, now=T0
    )
    assert seen.last_progress_time == 1_699_999_999.0 + 11


def test_remember_running_keeps_the_first_uid_per_index() -> None:
    seen = SeenPods()
    pods = [make_pod(0, uid="a"), make_pod(1, uid="b"), make_pod(0, attempt=0, uid="old")]
    observe.remember_running(seen, {"state": "Running", "attempt": 1}, pods)
    assert seen.uids == {0: "a", 1: "b"}
    observe.remember_running(seen, {"state": "Running", "attempt": 1}, [make_pod(0, uid="c")])
    assert seen.replaced(1, 0, "c")
    observe.remember_running(seen, {"state": "Running", "attempt": 2}, [make_pod(0, 2, uid="d")])
    assert seen.uids == {0: "d"}


def test_slim_pod_keeps_only_what_is_read() -> None:
    pod = make_pod(conditions=[disruption("EvictionByEvictionAPI")])
    pod["spec"]["volumes"] = [{"name": "x" * 1000}]
    slim = slim_pod(copy.deepcopy(pod))
    assert "volumes" not in slim["spec"]
    assert {c["type"] for c in slim["status"]["conditions"]} == {
        "Ready",
        "PodScheduled",
        "DisruptionTarget",
    }
    assert "controller-revision-hash" not in slim["metadata"]["labels"]
