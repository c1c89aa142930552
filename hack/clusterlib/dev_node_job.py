"""Adapts a TrainJob to the dev node of `hack/cluster up --real-node` (see docs/cluster.md).

The dev node's runtime image (`spotrun-runtime:dev`) is a busybox rootfs with a non-root
user: the ~6 GB virtualenv (torch and CUDA libraries) is too big for an image layer built
here. The pods mount this machine's Python instead, read-only at the same paths (the venv's
python is a symlink into the interpreter's prefix, and its scripts name the venv's path):
the interpreter's prefix, the repository (with its .venv) and the shared libraries they
link to. It also points the job's storage at the node's fake-gcs-server. A production
cluster uses the runtime image built from the Dockerfile and needs none of this.

    hack/dev-node-job examples/trainjob.yaml | kubectl apply -f -

With --operator-patch it prints instead a strategic-merge patch that does the same for the
Helm chart's operator Deployment (image spotrun-runtime:dev, host-Python mounts):

    kubectl -n spotrun-system patch deployment spotrun --patch "$(hack/dev-node-job --operator-patch)"
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
HOST_LIBS = "/usr/lib/x86_64-linux-gnu"
TRAINER = "trainer"


def python_prefix(venv: Path) -> Path:
    """The base interpreter's prefix of VENV (pyvenv.cfg `home` is its bin directory)."""
    for line in (venv / "pyvenv.cfg").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            return Path(value.strip()).parent
    raise SystemExit(f"{venv}/pyvenv.cfg names no `home`")


def host_mounts(repo: Path = REPO, venv: Path | None = None) -> list[tuple[str, str]]:
    """(volume name, host path) of everything the pods mount read-only at the same path."""
    venv = venv or repo / ".venv"
    mounts = [("host-python", str(python_prefix(venv))), ("host-repo", str(repo))]
    if not venv.resolve().is_relative_to(repo.resolve()):
        mounts.append(("host-venv", str(venv)))
    mounts.append(("host-libs", HOST_LIBS))
    return mounts


def dev_node_job(
    job: dict[str, Any],
    *,
    storage: str | None = None,
    gcs_endpoint: str | None = None,
    repo: Path = REPO,
    venv: Path | None = None,
) -> dict[str, Any]:
    """JOB with the host-Python mounts, its env, and (optionally) storage on fake-gcs-server."""
    job = copy.deepcopy(job)
    spec = job.setdefault("spec", {})
    venv = venv or repo / ".venv"
    trainer = spec.setdefault("trainer", {})
    trainer.setdefault("image", "spotrun-runtime:dev")
    # Imported with `ctr images import`; no registry could serve it.
    trainer["imagePullPolicy"] = "IfNotPresent"
    env = [e for e in trainer.get("env") or [] if e.get("name") not in _ENV_NAMES]
    env += [
        {"name": "PATH", "value": f"{venv}/bin:/bin"},
        {"name": "PYTHONPATH", "value": str(repo)},
        # torch, gloo and gcsfs write caches under HOME; the repo is mounted read-only.
        {"name": "HOME", "value": "/home/spotrun"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]
    if gcs_endpoint:
        env += [
            {"name": "STORAGE_EMULATOR_HOST", "value": gcs_endpoint},
            {"name": "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "value": "false"},
        ]
    trainer["env"] = env
    if storage:
        spec.setdefault("checkpoint", {})["storage"] = storage
    pod = spec.setdefault("template", {}).setdefault("spec", {})
    mounts = host_mounts(repo, venv)
    volumes = [v for v in pod.get("volumes") or [] if v.get("name") not in dict(mounts)]
    volumes += [
        {"name": name, "hostPath": {"path": path, "type": "Directory"}} for name, path in mounts
    ]
    pod["volumes"] = volumes
    containers = pod.setdefault("containers", [])
    entry = next((c for c in containers if c.get("name") == TRAINER), None)
    if entry is None:
        entry = {"name": TRAINER}
        containers.append(entry)
    entry["volumeMounts"] = [
        *[m for m in entry.get("volumeMounts") or [] if m.get("name") not in dict(mounts)],
        *[{"name": name, "mountPath": path, "readOnly": True} for name, path in mounts],
    ]
    return job


def operator_patch(repo: Path = REPO, venv: Path | None = None) -> dict[str, Any]:
    """A strategic-merge patch: the chart's operator container on the dev node's Python."""
    venv = venv or repo / ".venv"
    mounts = host_mounts(repo, venv)
    return {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "operator",
                            "image": "spotrun-runtime:dev",
                            "imagePullPolicy": "IfNotPresent",
                            "env": [
                                {"name": "PATH", "value": f"{venv}/bin:/bin"},
                                {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
                            ],
                            "volumeMounts": [
                                {"name": name, "mountPath": path, "readOnly": True}
                                for name, path in mounts
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": name, "hostPath": {"path": path, "type": "Directory"}}
                        for name, path in mounts
                    ],
                }
            }
        }
    }


_ENV_NAMES = {
    "PATH",
    "PYTHONPATH",
    "HOME",
    "PYTHONDONTWRITEBYTECODE",
    "STORAGE_EMULATOR_HOST",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hack/dev-node-job", description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", help="a TrainJob manifest (YAML)")
    parser.add_argument(
        "--operator-patch",
        action="store_true",
        help="print a patch for the chart's operator Deployment instead",
    )
    parser.add_argument(
        "--storage",
        default="gs://spotrun/runs",
        help="checkpoint storage (default gs://spotrun/runs, the node's fake-gcs-server)",
    )
    parser.add_argument(
        "--gcs-endpoint",
        default=os.environ.get("STORAGE_EMULATOR_HOST"),
        help="fake-gcs-server URL for the pods (default: $STORAGE_EMULATOR_HOST, which "
        "`hack/cluster up --real-node` prints)",
    )
    args = parser.parse_args(argv)
    if args.operator_patch:
        json.dump(operator_patch(), sys.stdout)
        print()
        return 0
    if not args.file:
        parser.error("a TrainJob manifest is needed (or --operator-patch)")
    job = yaml.safe_load(Path(args.file).read_text())
    storage = args.storage if args.storage.startswith("gs://") and args.gcs_endpoint else None
    if args.storage and not args.storage.startswith("gs://"):
        storage = args.storage
    if args.storage.startswith("gs://") and not args.gcs_endpoint:
        raise SystemExit("gs:// storage needs --gcs-endpoint or $STORAGE_EMULATOR_HOST")
    json.dump(dev_node_job(job, storage=storage, gcs_endpoint=args.gcs_endpoint), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
