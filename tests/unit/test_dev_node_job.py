"""hack/clusterlib/dev_node_job.py: a TrainJob adapted to the real node's images and bucket."""

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
                "env": [{"name": "A", "value": "1"}],
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


def test_the_job_runs_the_examples_image_with_nothing_of_the_host_mounted() -> None:
    out = load().dev_node_job(
        job(), storage="gs://spotrun/runs", gcs_endpoint="http://10.88.0.1:1234"
    )
    spec = out["spec"]
    assert spec["trainer"]["image"] == "spotrun.local/spotrun-examples:dev"
    assert spec["trainer"]["imagePullPolicy"] == "IfNotPresent"
    env = {e["name"]: e["value"] for e in spec["trainer"]["env"]}
    assert env == {
        "A": "1",
        "STORAGE_EMULATOR_HOST": "http://10.88.0.1:1234",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    assert spec["checkpoint"]["storage"] == "gs://spotrun/runs"
    # The user's template is the user's: no hostPath volume, no mount added.
    assert spec["template"] == job()["spec"]["template"]
    # Idempotent: adapting twice adds nothing.
    again = load().dev_node_job(
        out, storage="gs://spotrun/runs", gcs_endpoint="http://10.88.0.1:1234"
    )
    assert again == out
