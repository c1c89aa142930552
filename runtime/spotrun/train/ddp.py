"""`prepare_model`: Ray Train's `prepare_model`, DistributedDataParallel on this worker's device."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spotrun.train.group import get_device, world_size


def prepare_model(model: nn.Module, *, move_to_device: bool = True, **ddp_kwargs: Any) -> nn.Module:
    """Move `model` to this worker's device and wrap it in DistributedDataParallel.

    With a world size of 1 the model is returned moved but unwrapped, as Ray Train does.
    DDP prefixes state_dict keys with `module.`: save the state of the module you passed
    in (DDP shares its parameters), so a checkpoint loads into a plain module at any world
    size. `ddp_kwargs` go to DistributedDataParallel unchanged.
    """
    device = get_device()
    if move_to_device:
        model = model.to(device)
    if world_size() <= 1:
        return model
    if not dist.is_initialized():
        # The session joins the group when it starts; starting it here covers training
        # code that prepares its model before it touches any other spotrun API.
        from spotrun.train.session import get_session

        get_session()
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
        ddp_kwargs.setdefault("output_device", device.index)
    return DistributedDataParallel(model, **ddp_kwargs)
