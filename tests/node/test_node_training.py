"""TrainJobs on a real node: real pods train, lose a pod, get drained, and end bit for bit.

One TrainJob of 2 replicas (1 gloo worker each, CPU) runs examples.train_linear's
train_func_steps on the kubelet of `hack/cluster up --real-node`, with its checkpoints on
fake-gcs-server, under the operator as a user installs it: the Helm chart, unpatched, with
the operator image built from the Dockerfile, in a namespace that enforces Pod Security
"restricted". The training pods run the image built FROM the runtime image that holds the
examples (examples/Dockerfile), in a restricted namespace too; nothing of this machine is
mounted into any pod. It is interrupted twice:

1. without notice: the trainer container of one pod is SIGKILLed (every process in it, via
   containerd) and its pod force-deleted (`--grace-period=0 --force`), as when a node
   vanishes. Nothing can write a final checkpoint, so up to one checkpoint interval is lost.
   (A plain `kubectl delete pod` is a notice: the kubelet sends SIGTERM first.) Warm
   recovery keeps the other pod (same UID): only the lost one is replaced, and it gets the
   state from the survivor's memory.
2. with notice: the node is drained (`kubectl drain`, the Eviction API). Each pod gets
   SIGTERM, the runtime commits a final checkpoint at the next step and exits 75; the
   operator restarts the group, whose new pods stay Pending until the test uncordons.

After the drain the group restarts cold from status.latestCheckpoint; the job then completes, and its
final weights and Adam state equal those of an uninterrupted run of the same config
(`spotrun launch` on this machine, world size 2).

A second TrainJob keeps a warm spare (`spec.spares: 1`, three pods for a group of two): when a
member's pod is killed without notice, the waiting pod takes its place at once (no pod is
created or started for the group), the survivor and the spare keep their UIDs, and the
killed pod's replacement waits as the next spare. That job too ends bit for bit like the
uninterrupted run. Both tests share one operator install and one reference run.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from kubernetes import client

from spotrun.store import storage
from tests.cluster.operator_harness import GROUP, PLURAL, VERSION
from tests.cluster.test_chart_install import (
    PSS_RESTRICTED,
    Release,
    create_namespace,
    delete_namespace,
)
from tests.fixtures.cluster import wait_until
from tests.node.conftest import NODE_NAME, REPO, NodeCluster, dev_node_job, read_state
from tests.runtime.helpers import SPOTRUN, Job

pytestmark = pytest.mark.timeout(900)

STEPS = 240
EVERY = 20
CONFIG = {"steps": STEPS, "checkpoint_every": EVERY, "seed": 0, "batch_size": 8, "samples": 64}
FUNCTION = "examples.train_linear:train_func_steps"
# The chart's operator image as the node has it (hack/images build, imported by `up`).
OPERATOR_IMAGE = {"repository": "spotrun.local/spotrun-operator", "tag": "dev"}
EXAMPLES_IMAGE = dev_node_job.EXAMPLES_IMAGE


def the_job(name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples" / "trainjob.yaml").read_text())
    body["metadata"] = {"name": name}
    body["spec"]["config"] = {**CONFIG, "step_seconds": 0.1}
    # A final checkpoint of this model takes well under a second; shorter graces make the
    # old attempt's pods go sooner (a worker blocked in rendezvous only dies at the deadline,
    # which the operator derives from the grace: 12 s of 15).
    body["spec"]["template"] = {"spec": {"terminationGracePeriodSeconds": 15}}
    body["spec"]["failurePolicy"]["maxFailures"] = 5
    return body


def reference_run(tmp_path: Path) -> dict[str, Any]:
    """The same config, uninterrupted, on this machine: 2 workers, gloo on CPU."""
    job = Job(str(tmp_path / "reference"), name="reference")
    env = job.env(CONFIG, nproc=2, attempt=0, resume_from=None)
    proc = subprocess.run(
        [*SPOTRUN, "launch", "--nproc-per-node", "2", "--function", FUNCTION],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return load_checkpoint(job.latest_uri())


def load_checkpoint(uri: str) -> dict[str, Any]:
    manifest = json.loads(storage.read_bytes(f"{uri}/manifest.json"))
    data = storage.read_bytes(f"{uri}/rank-00000.pt")
    state: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True)
    return {"manifest": manifest, "state": state}


def assert_same_state(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path} keys differ"
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{path} lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def job_status(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name
    )
    status: dict[str, Any] = obj.get("status") or {}
    return status


def progress(status: dict[str, Any]) -> int:
    return int((status.get("lastMetrics") or {}).get("step", -1))


def restart_point(
    cluster: NodeCluster, api: client.ApiClient, ns: str, name: str, after: int
) -> tuple[dict[str, Any], int]:
    """Status at the group's restart after attempt AFTER, and the step it resumes from.

    Read the moment the attempt changes, before the new group can commit anything: the
    StatefulSet's SPOTRUN_RESUME_FROM must be status.latestCheckpoint.uri.
    """
    status = wait_until(
        f"a restart after attempt {after}",
        lambda: (s := job_status(api, ns, name)).get("attempt", 0) > after and s,
        timeout=240,
        interval=0.2,
    )
    sts = json.loads(cluster.kubectl("get", "statefulset", name, "-n", ns, "-o", "json").stdout)
    env = {
        e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    resume = env.get("SPOTRUN_RESUME_FROM")
    assert resume == status["latestCheckpoint"]["uri"], (resume, status["latestCheckpoint"])
    step = json.loads(storage.read_bytes(f"{resume}/manifest.json"))["step"]
    return status, int(step)


def training_again(
    api: client.ApiClient, ns: str, name: str, before: dict[str, Any]
) -> dict[str, Any]:
    """The status once a newer attempt than `before`'s trains past its restore point."""
    status: dict[str, Any] = wait_until(
        "the group to train again",
        lambda: (
            (s := job_status(api, ns, name)).get("state") == "Running"
            and s.get("attempt", 0) > before["attempt"]
            and "stepsLost" in (s.get("interruptions") or [{}])[-1]
            and progress(s) > int((s.get("restoredFrom") or {}).get("step", 1 << 30)) + 5
            and s
        ),
        timeout=240,
    )
    return status


def pod_uid(cluster: NodeCluster, ns: str, pod: str) -> str:
    obj = json.loads(cluster.kubectl("get", "pod", pod, "-n", ns, "-o", "json").stdout)
    return str(obj["metadata"]["uid"])


def kill_without_notice(cluster: NodeCluster, ns: str, pod: str) -> None:
    """SIGKILL every process of the pod's trainer container, then force-delete the pod."""
    obj = json.loads(cluster.kubectl("get", "pod", pod, "-n", ns, "-o", "json").stdout)
    container_id = obj["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    cluster.ctr("tasks", "kill", "--all", "--signal=SIGKILL", container_id)
    cluster.kubectl("delete", "pod", pod, "-n", ns, "--grace-period=0", "--force", "--wait=false")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return reference_run(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def operator(cluster: NodeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    release = install_operator(cluster, tmp_path_factory.mktemp("operator"))
    try:
        yield release
    finally:
        print(f"operator log:\n{operator_log(release)}")
        release.uninstall()
        delete_namespace(cluster, release.namespace)


def install_operator(cluster: NodeCluster, tmp_path: Path) -> Release:
    """The chart, as docs/demo.md installs it: the built image, a restricted namespace."""
    home = create_namespace(cluster, "spotrun-system", PSS_RESTRICTED)
    release = Release(cluster, "spotrun", home, tmp_path / "helm")
    release.install({"image": OPERATOR_IMAGE})
    cluster.kubectl(
        *("rollout", "status", f"deployment/{release.fullname}", "-n", home, "--timeout=180s"),
        timeout=200,
    )
    return release


def operator_log(release: Release) -> str:
    proc = release.cluster.kubectl(
        *("logs", f"deployment/{release.fullname}", "-n", release.namespace, "--tail=80"),
        check=False,
    )
    return proc.stdout + proc.stderr


def test_trainjob_survives_a_kill_and_a_drain_and_ends_like_an_uninterrupted_run(
    cluster: NodeCluster,
    namespace: str,
    reference: dict[str, Any],
    operator: Release,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", cluster.gcs_endpoint)
    # The training pods are admitted under "restricted" too (no hostPath, non-root).
    cluster.kubectl(
        "label", "namespace", namespace, *[f"{k}={v}" for k, v in PSS_RESTRICTED.items()]
    )
    name = "linear"
    try:
        with cluster.api_client() as api:
            body = cluster.job(the_job(name), storage=f"gs://spotrun/{namespace}")
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))

            # 1. No notice, once the group has trained past a few checkpoints.
            wait_until(
                "training past step 50",
                lambda: progress(job_status(api, namespace, name)) >= 50,
                timeout=240,
            )
            for pod in json.loads(
                cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout
            )["items"]:
                (trainer,) = [c for c in pod["spec"]["containers"] if c["name"] == "trainer"]
                assert trainer["image"] == EXAMPLES_IMAGE, trainer["image"]
                assert not [v for v in pod["spec"]["volumes"] if "hostPath" in v], pod["spec"]
            before_kill = job_status(api, namespace, name)
            survivor_uid = pod_uid(cluster, namespace, f"{name}-0")
            kill_without_notice(cluster, namespace, f"{name}-1")
            # Warm recovery: pod 0 stays (same UID, its processes alive), only pod 1 is
            # replaced, and it gets the state from pod 0's memory, not from the bucket.
            after_kill = training_again(api, namespace, name, before_kill)
            first = after_kill["interruptions"][-1]
            print(f"kill without notice at step >= {progress(before_kill)}: {first}")
            assert (first["kind"], first["recovery"]) == ("preemption", "warm"), first
            assert after_kill["group"]["kept"] == [0], after_kill["group"]
            assert pod_uid(cluster, namespace, f"{name}-0") == survivor_uid
            restored = after_kill["restoredFrom"]
            assert restored["tier"] == "memory", restored
            # Lost: the steps since the last snapshot in memory (one checkpoint interval).
            assert restored["step"] >= progress(before_kill) - EVERY, (restored, before_kill)
            assert first["stepsLost"] <= EVERY, first

            # 2. With notice: drain. The new attempt's pods wait, Pending, on the cordon.
            attempt = after_kill["attempt"]
            before_drain = job_status(api, namespace, name)
            cluster.kubectl(
                *("drain", NODE_NAME, "--ignore-daemonsets", "--delete-emptydir-data"),
                *("--pod-selector", f"spotrun.dev/job={name}", "--timeout=120s"),
                timeout=180,
            )
            drained, resumed = restart_point(cluster, api, namespace, name, attempt)
            # The final checkpoint is at least where the group was when the drain began.
            assert resumed >= progress(before_drain), (resumed, progress(before_drain))
            second = drained["interruptions"][-1]
            print(f"drain at step >= {progress(before_drain)}: {second}")
            assert second["kind"] == "preemption", second
            assert second["stepsLost"] <= 1, second
            pending = json.loads(
                cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout
            )["items"]
            assert all(p["status"]["phase"] == "Pending" for p in pending), [
                (p["metadata"]["name"], p["status"]["phase"]) for p in pending
            ]
            cluster.kubectl("uncordon", NODE_NAME)

            done = wait_until(
                "the job to succeed",
                lambda: (s := job_status(api, namespace, name)).get("state") == "Succeeded" and s,
                timeout=300,
            )
            assert done["preemptions"] >= 2, done
            assert_ends_like(done, reference)
            delete_job(api, namespace, name)
    finally:
        cluster.kubectl("uncordon", NODE_NAME, check=False)


def assert_ends_like(done: dict[str, Any], reference: dict[str, Any]) -> None:
    """The job's last checkpoint holds the uninterrupted run's weights, Adam state and metrics."""
    assert done["latestCheckpoint"]["step"] == STEPS - 1
    final = load_checkpoint(done["latestCheckpoint"]["uri"])
    assert final["manifest"]["metrics"] == reference["manifest"]["metrics"]
    assert_same_state(final["state"], reference["state"])


def delete_job(api: client.ApiClient, ns: str, name: str) -> None:
    custom = client.CustomObjectsApi(api)
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    wait_until(
        "the TrainJob to go",
        lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"],
        timeout=60,
    )


# What a waiting spare's worker logs once its imports are done (train/_function_worker.py).
SPARE_READY = "ready, waiting to be promoted into a group"


def spare_ready(cluster: NodeCluster, ns: str, pod: str) -> bool:
    proc = cluster.kubectl("logs", pod, "-n", ns, "-c", "trainer", check=False)
    return SPARE_READY in proc.stdout


def test_a_warm_spare_takes_a_killed_members_place_and_the_job_ends_bit_for_bit(
    cluster: NodeCluster,
    namespace: str,
    reference: dict[str, Any],
    operator: Release,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", cluster.gcs_endpoint)
    name = "spare"
    body = the_job(name)
    body["spec"]["spares"] = 1
    with cluster.api_client() as api:
        cluster.kubectl(
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
            input=json.dumps(cluster.job(body, storage=f"gs://spotrun/{namespace}")),
        )
        # Pods 0 and 1 form the group; pod 2 waits, torch imported, outside it.
        wait_until(
            "training past step 50 with a ready spare",
            lambda: (
                progress(job_status(api, namespace, name)) >= 50
                and spare_ready(cluster, namespace, f"{name}-2")
            ),
            timeout=300,
        )
        before = job_status(api, namespace, name)
        assert (before["group"].get("members") or [0, 1]) == [0, 1], before["group"]
        uids = {i: pod_uid(cluster, namespace, f"{name}-{i}") for i in range(3)}
        kill_without_notice(cluster, namespace, f"{name}-1")
        after = training_again(api, namespace, name, before)
        event = after["interruptions"][-1]
        print(f"kill of member 1 at step >= {progress(before)}: {event}, group {after['group']}")
        assert (event["kind"], event["recovery"]) == ("preemption", "warm"), event
        # The spare (pod 2) took node rank 1; the survivor and the spare are the same pods.
        assert after["group"]["members"] == [0, 2], after["group"]
        assert pod_uid(cluster, namespace, f"{name}-0") == uids[0]
        assert pod_uid(cluster, namespace, f"{name}-2") == uids[2]
        assert after["restoredFrom"]["tier"] == "memory", after["restoredFrom"]
        assert event["stepsLost"] <= EVERY, event
        # The killed pod came back from the new template as the next spare, waiting.
        wait_until(
            "pod 1 to wait as the next spare",
            lambda: spare_ready(cluster, namespace, f"{name}-1"),
            timeout=240,
        )
        assert pod_uid(cluster, namespace, f"{name}-1") != uids[1]

        done = wait_until(
            "the job to succeed",
            lambda: (s := job_status(api, namespace, name)).get("state") == "Succeeded" and s,
            timeout=300,
        )
        assert_ends_like(done, reference)
        delete_job(api, namespace, name)


def freeze(cluster: NodeCluster, ns: str, pod: str) -> str:
    """Freezes every process of the pod's trainer container (containerd pauses its cgroup).

    The kubelet still reports it running and none of its connections close: to its peers it
    is a node that lost its network or its power. Returns the container's id.
    """
    obj = json.loads(cluster.kubectl("get", "pod", pod, "-n", ns, "-o", "json").stdout)
    container_id = str(obj["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1])
    cluster.ctr("tasks", "pause", container_id)
    return container_id


def kubelet_pid(cluster: NodeCluster) -> int:
    assert cluster.run_dir is not None
    return int(read_state(cluster.run_dir)["processes"]["kubelet"]["pid"])


def node_ready(cluster: NodeCluster) -> bool:
    node = json.loads(cluster.kubectl("get", "node", NODE_NAME, "-o", "json").stdout)
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def pod_uids(cluster: NodeCluster, ns: str) -> dict[str, str]:
    listed = json.loads(cluster.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in listed["items"]}


@pytest.mark.parametrize("kubelet", ["answers", "stopped"])
def test_a_member_gone_silent_is_reported_by_its_peer_and_replaced_warm(
    cluster: NodeCluster,
    namespace: str,
    reference: dict[str, Any],
    operator: Release,
    monkeypatch: pytest.MonkeyPatch,
    kubelet: str,
) -> None:
    """Nothing tells Kubernetes that a frozen pod is lost: its node stays Ready, its container
    running. The survivor's peer watch does, through status.peerReports; the operator then
    restarts the group warm without it, and the job still ends bit for bit.

    `answers`: the container alone is frozen (the pods' network cut, the kubelet still
    talking to the API server); its kubelet confirms the graceful deletion. `stopped`: the
    kubelet is frozen too, as on a node gone without notice, so nobody confirms it; the
    operator force-deletes the pod long before the node controller would declare the node
    NotReady. The dev cluster has one node, so the kubelet resumes once the pod is gone
    (the replacement has nowhere else to run)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", cluster.gcs_endpoint)
    name = f"silent-{kubelet}"
    body = the_job(name)
    body["spec"]["trainer"]["env"] = [{"name": "SPOTRUN_PEER_TIMEOUT_SECONDS", "value": "3"}]
    with cluster.api_client() as api:
        cluster.kubectl(
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
            input=json.dumps(cluster.job(body, storage=f"gs://spotrun/{namespace}")),
        )
        wait_until(
            "training past step 50",
            lambda: progress(job_status(api, namespace, name)) >= 50,
            timeout=300,
        )
        before = job_status(api, namespace, name)
        survivor_uid = pod_uid(cluster, namespace, f"{name}-0")
        silent_uid = pod_uid(cluster, namespace, f"{name}-1")
        frozen = freeze(cluster, namespace, f"{name}-1")
        stopped = kubelet == "stopped"
        if stopped:
            os.kill(kubelet_pid(cluster), signal.SIGSTOP)
        try:
            if stopped:
                wait_until(
                    "the silent member's pod forced out",
                    lambda: pod_uids(cluster, namespace).get(f"{name}-1") != silent_uid,
                    timeout=40,
                )
                # Not the node controller's doing: the node is still Ready.
                assert node_ready(cluster)
                forced = job_status(api, namespace, name)["interruptions"][-1]
                assert forced["unresponsive"] == [1], forced
                os.kill(kubelet_pid(cluster), signal.SIGCONT)
                stopped = False
            after = training_again(api, namespace, name, before)
        finally:
            if stopped:
                os.kill(kubelet_pid(cluster), signal.SIGCONT)
            cluster.ctr("tasks", "resume", frozen, check=False)  # gone by now, normally
        event = after["interruptions"][-1]
        print(f"freeze of member 1 (kubelet {kubelet}) at step >= {progress(before)}: {event}")
        assert (event["kind"], event["reason"], event["recovery"]) == (
            "preemption",
            "PeerUnresponsive",
            "warm",
        ), event
        assert event["unresponsive"] == [1], event
        report = after["peerReports"]["0"]
        assert (report["attempt"], report["nodes"]) == (before["attempt"], [1]), report
        assert after["group"]["kept"] == [0], after["group"]
        assert pod_uid(cluster, namespace, f"{name}-0") == survivor_uid
        assert after["restoredFrom"]["tier"] == "memory", after["restoredFrom"]
        assert event["stepsLost"] <= EVERY, event

        done = wait_until(
            "the job to succeed",
            lambda: (s := job_status(api, namespace, name)).get("state") == "Succeeded" and s,
            timeout=300,
        )
        assert_ends_like(done, reference)
        delete_job(api, namespace, name)
