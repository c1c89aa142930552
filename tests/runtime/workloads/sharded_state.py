"""Saves or restores a DTensor sharded across the group through DCP (config: mode save|load)."""

from __future__ import annotations

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
    checkpoint.load_sharded_state_dict(state)
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
