"""A training function whose rank `hold_rank` keeps the interpreter lock for `hold_seconds`
at step `hold_at_step`, in one C call, as user code may (a C extension that never releases
it): no thread of that process runs meanwhile, the peer watch's neither.

config: steps, step_seconds, hold_rank, hold_at_step, hold_seconds. Each step is one
all-reduce, so the other ranks wait in a collective while the lock is held.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import torch
import torch.distributed as dist

import spotrun


def train_func(config: dict[str, Any]) -> None:
    rank = spotrun.get_context().get_world_rank()
    checkpoint = spotrun.get_checkpoint()
    start = checkpoint.to_dict()["step"] + 1 if checkpoint else 0
    for step in range(start, int(config["steps"])):
        if rank == int(config["hold_rank"]) and step == int(config["hold_at_step"]):
            print(f"interpreter_lock: holding it for {config['hold_seconds']}s", flush=True)
            # A PyDLL call keeps the interpreter lock for its whole length.
            ctypes.PyDLL(None).usleep(int(float(config["hold_seconds"]) * 1e6))
            print("interpreter_lock: released", flush=True)
        value = torch.ones(1)
        dist.all_reduce(value)
        time.sleep(float(config.get("step_seconds", 0.05)))
        spotrun.report(
            {"step": step, "sum": float(value)},
            checkpoint=spotrun.Checkpoint.from_dict({"step": step}) if step % 10 == 0 else None,
        )
