"""hack/clusterlib/dev_node_job.py: a TrainJob adapted to the real node's host-Python pods."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "dev_node_job", REPO / "hack" / "clusterlib" / "dev_node_job.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / ".venv").mkdir(parents=True)
    (repo / ".venv" / "pyvenv.cfg").write_text("home = /opt/python/3.11/bin\nversion = 3.11\n")
    return repo


def job() -> dict[str, Any]:
    return {
        "apiVersion": "spotrun.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "j"},
        "spec": {
            "replicas": 2,
            "trainer": {
                "image": "spotrun-runtime:dev",
                "function": "m:f",
                "env": [{"name": "A", "value": "1"}, {"name": "PATH", "value": "/old"}],
            },
            "template": {
                "spec": {
                    "volumes": [{"name": "data", "emptyDir": {}}],
                    "containers": [
                        {"name": "trainer", "volumeMounts": [{"name": "data", "mountPath": "/d"}]}
                    ],
                }
            },
        },
    }


def test_mounts_the_host_python_at_the_same_paths_and_keeps_the_users_template(
    tmp_path: Path,
) -> None:
    repo = fake_repo(tmp_path)
    out = load().dev_node_job(
        job(), storage="gs://spotrun/runs", gcs_endpoint="http://10.88.0.1:1234", repo=repo
    )
    spec = out["spec"]
    env = {e["name"]: e["value"] for e in spec["trainer"]["env"]}
    assert env["A"] == "1"
    assert env["PATH"] == f"{repo}/.venv/bin:/bin"
    assert env["PYTHONPATH"] == str(repo)
    assert env["STORAGE_EMULATOR_HOST"] == "http://10.88.0.1:1234"
    assert [e["name"] for e in spec["trainer"]["env"]].count("PATH") == 1
    assert spec["trainer"]["imagePullPolicy"] == "IfNotPresent"
    assert spec["checkpoint"]["storage"] == "gs://spotrun/runs"
    pod = spec["template"]["spec"]
    paths = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    assert paths == {
        "data": None,
        "host-python": "/opt/python/3.11",
        "host-repo": str(repo),
        "host-libs": "/usr/lib/x86_64-linux-gnu",
    }
    (trainer,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in trainer["volumeMounts"]}
    assert set(mounts) == {"/d", "/opt/python/3.11", str(repo), "/usr/lib/x86_64-linux-gnu"}
    assert all(m["readOnly"] for p, m in mounts.items() if p != "/d")
    # Idempotent: adapting twice adds nothing.
    again = load().dev_node_job(
        out, storage="gs://spotrun/runs", gcs_endpoint="http://10.88.0.1:1234", repo=repo
    )
    assert again == out


def test_operator_patch_targets_the_charts_operator_container(tmp_path: Path) -> None:
    repo = fake_repo(tmp_path)
    patch = load().operator_patch(repo=repo)
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "operator"
    assert container["image"] == "spotrun-runtime:dev"
    volumes = patch["spec"]["template"]["spec"]["volumes"]
    assert {v["name"] for v in volumes} == {m["name"] for m in container["volumeMounts"]}
