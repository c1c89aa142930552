"""Adapts a TrainJob to the dev node of `hack/cluster up --real-node` (see docs/cluster.md).

The node has no registry: its pods run the images `hack/images` built from the Dockerfile
and `up` imported, the training pods `spotrun.local/spotrun-examples:dev` (the runtime
image with the repository's examples/ package, examples/Dockerfile). This sets the job's
trainer image to it, and its checkpoint storage to the node's fake-gcs-server (the bucket
`spotrun`, `STORAGE_EMULATOR_HOST` in the trainer's env). Nothing of this machine is mounted
into the pods.

    hack/dev-node-job examples/trainjob.yaml | kubectl apply -f -
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

# The examples' training image as the node has it (imagebuild.node_ref("examples")).
EXAMPLES_IMAGE = "spotrun.local/spotrun-examples:dev"

_ENV_NAMES = {"STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}


def dev_node_job(
    job: dict[str, Any],
    *,
    storage: str | None = None,
    gcs_endpoint: str | None = None,
    image: str = EXAMPLES_IMAGE,
) -> dict[str, Any]:
    """JOB on the node's examples image, with (optionally) storage on fake-gcs-server."""
    job = copy.deepcopy(job)
    spec = job.setdefault("spec", {})
    trainer = spec.setdefault("trainer", {})
    trainer["image"] = image
    # Imported with `ctr images import`; no registry could serve it.
    trainer["imagePullPolicy"] = "IfNotPresent"
    env = [e for e in trainer.get("env") or [] if e.get("name") not in _ENV_NAMES]
    if gcs_endpoint:
        env += [
            {"name": "STORAGE_EMULATOR_HOST", "value": gcs_endpoint},
            {"name": "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "value": "false"},
        ]
    if env:
        trainer["env"] = env
    if storage:
        spec.setdefault("checkpoint", {})["storage"] = storage
    return job


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hack/dev-node-job", description=__doc__.split("\n")[0])
    parser.add_argument("file", help="a TrainJob manifest (YAML)")
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
    parser.add_argument(
        "--image", default=EXAMPLES_IMAGE, help=f"the trainer image (default {EXAMPLES_IMAGE})"
    )
    args = parser.parse_args(argv)
    if args.storage.startswith("gs://") and not args.gcs_endpoint:
        raise SystemExit(
            "gs:// storage on the node needs its fake-gcs-server: pass --gcs-endpoint, or set "
            'STORAGE_EMULATOR_HOST (eval "$(hack/cluster env)" exports it)'
        )
    job = yaml.safe_load(Path(args.file).read_text())
    gcs = args.gcs_endpoint if args.storage.startswith("gs://") else None
    json.dump(
        dev_node_job(job, storage=args.storage, gcs_endpoint=gcs, image=args.image), sys.stdout
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
