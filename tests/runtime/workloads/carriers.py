"""Which ranks carry a checkpoint: config `carriers` maps rank -> "dict", "directory" or None.

Each report passes rank r's kind of checkpoint (holding {"step", "rank"}), so a test can have
rank 0 pass nothing while rank 1 carries the data, or ranks disagree on the kind.
config: steps, carriers, out (rank 0 writes what get_checkpoint() returned, as JSON).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import spotrun
from spotrun import Checkpoint

ctx = spotrun.get_context()
cfg = ctx.config
kind = cfg["carriers"].get(str(ctx.world_rank))

resumed = None
checkpoint = spotrun.get_checkpoint()
if checkpoint is not None:
    try:
        resumed = {"dict": checkpoint.to_dict()}
    except Exception as err:  # a directory checkpoint: read its files back
        with checkpoint.as_directory() as folder:
            resumed = {
                "files": {
                    os.path.relpath(os.path.join(d, n), folder): Path(d, n).read_text()
                    for d, _, names in os.walk(folder)
                    for n in names
                },
                "to_dict_error": str(err),
            }
if ctx.world_rank == 0 and cfg.get("out"):
    with open(cfg["out"], "w") as out:
        json.dump({"resumed": resumed}, out, default=str)

for step in range(int(cfg["steps"])):
    ckpt = None
    if kind == "dict":
        ckpt = Checkpoint.from_dict({"step": step, "rank": ctx.world_rank})
    elif kind == "directory":
        folder = tempfile.mkdtemp()
        with open(os.path.join(folder, "state.txt"), "w") as f:
            f.write(f"step {step} from rank {ctx.world_rank}")
        ckpt = Checkpoint.from_directory(folder)
    spotrun.report({"loss": 1.0 / (step + 1)}, checkpoint=ckpt)
