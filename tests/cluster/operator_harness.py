"""Shared pieces of the operator's cluster tests: the CRD, the operator process, TrainJobs.

The operator runs as in production, `python -m spotrun_operator` in its own process with
a kubeconfig, namespaced to the test's namespace, and is stopped (or SIGKILLed, where a
test wants that) before the test ends. The runtime's part is played by the test itself
through the real kube sink with the job's own ServiceAccount token (TokenRequest API),
since KWOK pods run no containers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from spotrun.ledger.kube_sink import KubernetesSink
from spotrun.ledger.retention import Retention
from spotrun.local.ports import free_port
from spotrun.store.manifest import Commit, FileRecord, Manifest
from tests.fixtures.cluster import Cluster, wait_until

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "trainjobs.spotrun.dev.yaml"
GROUP, VERSION, PLURAL = "spotrun.dev", "v1alpha1", "trainjobs"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
STORAGE = "gs://spotrun-test/runs"


def install_crd(cluster: Cluster) -> None:
    """Applies the CRD (idempotent) and waits until the API serves it."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/trainjobs.spotrun.dev", "--timeout=60s"
    )


@pytest.fixture(scope="session")
def trainjob_crd(cluster: Cluster) -> Cluster:
    install_crd(cluster)
    return cluster


@pytest.fixture(scope="session")
def api(trainjob_crd: Cluster) -> Iterator[client.ApiClient]:
    with trainjob_crd.api_client() as api_client:
        yield api_client


class Operator:
    """`python -m spotrun_operator` serving one namespace, with its metrics and probe ports."""

    def __init__(self, cluster: Cluster, namespace: str, log_dir: Path, *extra: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.log_path = log_dir / f"operator-{namespace}.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.starts = 0

    def start(self) -> Operator:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.metrics_port, probe_port = free_port(), free_port()
        self.probe_url = f"http://127.0.0.1:{probe_port}/healthz"
        env = {
            **os.environ,
            "KUBECONFIG": self.cluster.kubeconfig,
            "PYTHONUNBUFFERED": "1",
            # The operator of this checkout, whatever spotrun the interpreter has installed.
            "PYTHONPATH": os.pathsep.join(
                filter(
                    None,
                    [str(REPO / "runtime"), str(REPO / "operator"), os.environ.get("PYTHONPATH")],
                )
            ),
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "spotrun_operator",
                    f"--namespace={self.namespace}",
                    f"--metrics-address=127.0.0.1:{self.metrics_port}",
                    f"--liveness={self.probe_url}",
                    "--log-format=json",
                    "--resync-seconds=15",
                    *self.extra,
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        wait_until("the operator's liveness probe", self.alive, timeout=60)
        return self

    def alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.probe_url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies under the operator."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self, tail: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-tail:])

    def metrics(self) -> dict[str, float]:
        """The operator's Prometheus samples, `name{labels}` -> value."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def tracebacks(self) -> list[str]:
        """Log records with an exception (a handler or a pass that raised)."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "Traceback" in line or '"exc_info"' in line:
                found.append(line)
        return found


@pytest.fixture
def operator(
    api: client.ApiClient, cluster: Cluster, namespace: str, tmp_path: Path
) -> Iterator[Operator]:
    """The operator serving the test's namespace; stopped after its TrainJobs are deleted."""
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        yield op
    finally:
        try:
            if op.proc is not None and op.proc.poll() is None:
                # While the operator runs, so that kopf removes its finalizers.
                custom = client.CustomObjectsApi(api)
                custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
                wait_until(
                    "the test's TrainJobs to be deleted",
                    lambda: (
                        not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
                            "items"
                        ]
                    ),
                    timeout=60,
                )
        finally:
            op.stop()
            print(f"operator log ({op.log_path}):\n{op.log(40)}")


# -- TrainJobs ----------------------------------------------------------------------------


def trainjob(name: str, replicas: int = 2, **spec: Any) -> dict[str, Any]:
    """A TrainJob of `replicas` one-GPU pods on the spot nodes; `spec` keys override."""
    body: dict[str, Any] = {
        "replicas": replicas,
        "nprocPerNode": 1,
        "trainer": {
            "image": PAUSE_IMAGE,
            "function": "examples.train_linear:train",
            "resources": {"limits": {"nvidia.com/gpu": "1"}},
        },
        "checkpoint": {"storage": STORAGE},
        "failurePolicy": {"backoff": {"initialSeconds": 1, "maxSeconds": 2, "jitter": 0.1}},
        "template": {"spec": {"nodeSelector": {"cloud.google.com/gke-spot": "true"}}},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name},
        "spec": body,
    }


def create(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    return created


def get_job(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    job: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return job


def patch_spec(api: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        {"spec": spec},
        _content_type="application/merge-patch+json",
    )


def status(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return dict(get_job(api, namespace, name).get("status") or {})


def pods(api: client.ApiClient, namespace: str, name: str) -> list[dict[str, Any]]:
    """The job's pods as plain dicts (deleting ones included)."""
    listed = client.CoreV1Api(api).list_namespaced_pod(
        namespace, label_selector=f"spotrun.dev/job={name}", _preload_content=False
    )
    items: list[dict[str, Any]] = json.loads(listed.data)["items"]
    return items


def running_pods(
    api: client.ApiClient, namespace: str, name: str, attempt: int
) -> list[dict[str, Any]]:
    return [
        p
        for p in pods(api, namespace, name)
        if p["metadata"]["labels"].get("spotrun.dev/attempt") == str(attempt)
        and p["status"].get("phase") == "Running"
        and "deletionTimestamp" not in p["metadata"]
    ]


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    trainer = next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in trainer.get("env", [])}


def wait_running(
    api: client.ApiClient,
    namespace: str,
    name: str,
    attempt: int,
    replicas: int,
    timeout: float = 90,
) -> dict[str, Any]:
    """Waits until the job is Running as `attempt` with `replicas` running pods of it."""

    def ready() -> dict[str, Any] | None:
        st = status(api, namespace, name)
        if st.get("state") != "Running" or st.get("attempt") != attempt:
            return None
        if len(running_pods(api, namespace, name, attempt)) != replicas:
            return None
        return st

    result: dict[str, Any] = wait_until(
        f"TrainJob {name} Running as attempt {attempt} with {replicas} pods", ready, timeout=timeout
    )
    return result


# -- the runtime's part: the kube sink with the job's own token ----------------------------


def kubeconfig_server(cluster: Cluster) -> tuple[str, str]:
    """The API server's URL and its CA (PEM) from the admin kubeconfig."""
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    entry = config["clusters"][0]["cluster"]
    if "certificate-authority-data" in entry:
        ca = base64.b64decode(entry["certificate-authority-data"]).decode()
    else:
        ca = Path(entry["certificate-authority"]).read_text()
    return str(entry["server"]), ca


def runtime_token(api: client.ApiClient, namespace: str, account: str) -> str:
    """A short-lived token of `account` from the TokenRequest API, as the kubelet mounts one."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    )
    answer = client.CoreV1Api(api).create_namespaced_service_account_token(
        account, namespace, request
    )
    return str(answer.status.token)


def runtime_sink(
    cluster: Cluster,
    api: client.ApiClient,
    namespace: str,
    job: str,
    attempt: int,
    *,
    as_job: str | None = None,
) -> KubernetesSink:
    """The sink rank 0 of `job` would build, authenticated as the job's runtime account.

    `as_job` targets another job's status with this job's token (to show it is refused).
    """
    server, ca = kubeconfig_server(cluster)
    return KubernetesSink(
        server=server,
        token=runtime_token(api, namespace, f"{job}-runtime"),
        ca_data=ca,
        job=as_job or job,
        namespace=namespace,
        attempt=attempt,
        retries=2,
    )


def record_checkpoint(sink: KubernetesSink, seq: int, step: int) -> str:
    """Records checkpoint `seq` at `step` as rank 0 would after its manifest; returns its URI."""
    commit = checkpoint_commit(sink, seq, step)
    sink.record(commit, Retention(keep=(seq,), delete=(), best=(), latest=seq), [commit.entry()])
    return commit.uri


def checkpoint_commit(sink: KubernetesSink, seq: int, step: int) -> Commit:
    """Checkpoint `seq` of the sink's job at `step`, as its manifest would describe it."""
    uri = f"{STORAGE}/{sink.namespace}/{sink.job}/ckpt-{seq:06d}"
    manifest = Manifest(
        seq=seq,
        step=step,
        kind="replicated",
        attempt=sink.attempt,
        world_size=2,
        time=time.time(),
        files=(FileRecord(0, "rank-00000.pt", 1024, "0" * 64),),
        metrics={"loss": round(1.0 / (step + 1), 4)},
    )
    return Commit(uri, manifest, hashlib.sha256(manifest.to_bytes()).hexdigest())


@contextlib.contextmanager
def temp_nodes(
    cluster: Cluster, prefix: str, count: int, gpus: int = 8
) -> Iterator[dict[str, str]]:
    """`count` KWOK nodes labelled with a pool of their own; yields the pool's nodeSelector."""
    if not cluster.local:
        pytest.skip("adds and deletes nodes: runs only on the local KWOK cluster")
    pool = {"spotrun.test/pool": prefix}
    names = [f"{prefix}-{i}" for i in range(count)]
    try:
        for name in names:
            cluster.add_node(name, gpus=gpus, labels=pool)
        yield pool
    finally:
        cluster.kubectl("delete", "node", *names, "--ignore-not-found", "--wait=false")


def api_error(call: Any) -> ApiException:
    """Runs `call` and returns the ApiException it must raise."""
    try:
        call()
    except ApiException as err:
        return err
    raise AssertionError("the API server accepted it")


def message_of(err: ApiException) -> str:
    try:
        return str(json.loads(err.body)["message"])
    except (ValueError, KeyError, TypeError):
        return str(err.body)
