"""The node tier's cluster: `hack/cluster up --real-node` (a real kubelet on containerd).

The `cluster` fixture of tests/fixtures/cluster.py is overridden here, so `namespace` and
the helpers of tests/cluster work unchanged on this cluster. Its API server listens on the
node bridge's gateway (10.88.0.1), as do CoreDNS and fake-gcs-server (the pods' checkpoint
storage). The pods run the Dockerfile's images, which `hack/images` built and `up` imported:
the chart's operator image, and the training image built FROM the runtime image with the
examples (hack/clusterlib/dev_node_job.py points a TrainJob at it and at the bucket).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.fixtures.cluster import RUN_DIR_ENV, Cluster, hack_cluster

REPO = Path(__file__).resolve().parents[2]
NODE_NAME = "spotrun-node"


def _load_dev_node_job() -> ModuleType:
    path = REPO / "hack" / "clusterlib" / "dev_node_job.py"
    spec = importlib.util.spec_from_file_location("dev_node_job", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dev_node_job = _load_dev_node_job()


@dataclass
class NodeCluster(Cluster):
    """The cluster with its real node: where storage is, and a containerd client."""

    gcs_endpoint: str = ""
    containerd_socket: str = ""

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def job(self, body: dict[str, Any], storage: str) -> dict[str, Any]:
        """BODY adapted to the dev node: the examples image, storage on fake-gcs-server."""
        result: dict[str, Any] = dev_node_job.dev_node_job(
            body, storage=storage, gcs_endpoint=self.gcs_endpoint
        )
        return result


def _node_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "the node tier needs root (containerd, runc, network namespaces, buildah)"
    if shutil.which("go") is None and not Path.home().joinpath(".cache/spotrun/bin").exists():
        return "`go` is needed to build kubelet and CoreDNS"
    return None


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    reason = _node_prerequisites()
    if reason:
        pytest.skip(reason)
    run_dir = Path(os.environ.get(RUN_DIR_ENV) or tmp_path_factory.mktemp("node-cluster"))
    try:
        out = hack_cluster("up", "--real-node", f"--run-dir={run_dir}")
        kubeconfig = re.search(r"^export KUBECONFIG=(\S+)$", out, re.M)
        gcs = re.search(r"^export STORAGE_EMULATOR_HOST=(\S+)$", out, re.M)
        assert kubeconfig and gcs, f"hack/cluster up --real-node printed: {out!r}"
        yield NodeCluster(
            kubeconfig=kubeconfig.group(1),
            local=True,
            run_dir=run_dir,
            gcs_endpoint=gcs.group(1),
            containerd_socket=str(run_dir / "node" / "containerd" / "containerd.sock"),
        )
    finally:
        hack_cluster("down", f"--run-dir={run_dir}", timeout=180)
        left = subprocess.run(["ip", "link", "show", "spotrun0"], capture_output=True).returncode
        assert left != 0, "hack/cluster down left the node bridge behind"


def read_state(run_dir: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((run_dir / "state.json").read_text())
    return state
