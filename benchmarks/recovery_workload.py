"""The training script of benchmarks/recovery.py: train_func_steps, with timestamps.

Run by `spotrun launch -- python benchmarks/recovery_workload.py` in each pod. It prints
`[recovery-mark] NAME UNIX_TIME ATTEMPT` lines that the benchmark reads from the pods' logs:
  imported           python started and imported torch and spotrun
  rendezvous         the session is up: every rank joined the process group (gloo)
  checkpoint_loaded  the checkpoint named by SPOTRUN_RESUME_FROM is read and verified
  first_step         the first training step of this attempt was reported
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTEMPT = os.environ.get("SPOTRUN_ATTEMPT", "?")


def mark(name: str) -> None:
    print(f"[recovery-mark] {name} {time.time():.6f} {ATTEMPT}", flush=True)


import torch  # noqa: E402
from examples import train_linear  # noqa: E402

import spotrun  # noqa: E402

mark("imported")


def main() -> None:
    context = spotrun.get_context()  # starts the session: joins the process group
    mark("rendezvous")
    if spotrun.get_checkpoint() is None:
        mark("checkpoint_loaded")  # a fresh start: nothing to load
    # The training function reads the checkpoint itself (once): time its first to_dict().
    # Later calls are the session's own (report() reads each checkpoint it is passed).
    to_dict = spotrun.Checkpoint.to_dict
    loaded = False

    def marking_to_dict(self: spotrun.Checkpoint) -> dict[str, Any]:
        nonlocal loaded
        data = to_dict(self)
        if not loaded:
            loaded = True
            mark("checkpoint_loaded")
        return data

    spotrun.Checkpoint.to_dict = marking_to_dict  # type: ignore[method-assign]
    report = spotrun.report
    first = True

    def marking_report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        nonlocal first
        report(metrics, checkpoint=checkpoint)
        if first:
            first = False
            mark("first_step")

    spotrun.report = marking_report  # type: ignore[assignment]
    torch.set_num_threads(1)
    train_linear.train_func_steps(dict(context.config))


if __name__ == "__main__":
    main()
