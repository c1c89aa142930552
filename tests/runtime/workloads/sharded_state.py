"""Saves or restores a DTensor sharded across the group through DCP (config: mode save|load).

With trace_reads, a load prints the checkpoint files this rank fetched and verified for it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import spotrun
from spotrun import Checkpoint

ctx = spotrun.get_context()
cfg = ctx.config
full = torch.arange(64 * 6, dtype=torch.float32).reshape(64, 6)

if ctx.world_size > 1:
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    weight = distribute_tensor(
        torch.zeros_like(full) if cfg["mode"] == "load" else full, mesh, [Shard(0)]
    )
else:
    weight = torch.zeros_like(full) if cfg["mode"] == "load" else full.clone()
state = {"weight": weight, "step": torch.tensor(7)}

if cfg["mode"] == "save":
    spotrun.report({"step": 7}, checkpoint=Checkpoint.from_sharded_state_dict(state))
else:
    checkpoint = spotrun.get_checkpoint()
    assert checkpoint is not None and checkpoint.kind == "dcp", checkpoint
    reads: list[str] = []
    if cfg.get("trace_reads"):
        from spotrun.store import trust

        verified_copy = trust.verified_copy

        def traced(url: str, record: Any, staging: Any) -> Any:
            reads.append(record.path)
            return verified_copy(url, record, staging)

        trust.verified_copy = traced  # type: ignore[assignment]
    checkpoint.load_sharded_state_dict(state)
    if cfg.get("trace_reads"):
        print(f"rank {ctx.world_rank} read {sorted(reads)}", flush=True)
    loaded = state["weight"].full_tensor() if ctx.world_size > 1 else state["weight"]
    assert torch.equal(loaded, full), "resharded weights differ"
    if ctx.world_size > 1:
        local = state["weight"].to_local()
        assert local.shape[0] == 64 // ctx.world_size
    print(
        f"rank {ctx.world_rank} restored {tuple(loaded.shape)} on world size {ctx.world_size}",
        flush=True,
    )
    if dist.is_initialized():
        dist.barrier()
