"""`prepare_model`: Ray Train's `prepare_model`, DistributedDataParallel on this worker's device.

With a global elastic batch (SPOTRUN_ELASTIC_BATCH=global) the ranks of a shrunken group can
hold unequal shares of a step's samples, and DDP's mean of the per-rank gradients is then not
the gradient of the step's mean loss; `sample_weighted_allreduce_hook` weights each rank by
its share instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spotrun.train.data import batch_is_global, step_share
from spotrun.train.group import get_device, world_size

CommHook = Callable[[Any, Any], torch.futures.Future[torch.Tensor]]


def prepare_model(
    model: nn.Module,
    *,
    move_to_device: bool = True,
    comm_hook: CommHook | None = None,
    comm_hook_state: Any = None,
    **ddp_kwargs: Any,
) -> nn.Module:
    """Move `model` to this worker's device and wrap it in DistributedDataParallel.

    With a world size of 1 the model is returned moved but unwrapped, as Ray Train does.
    DDP prefixes state_dict keys with `module.`: save the state of the module you passed
    in (DDP shares its parameters), so a checkpoint loads into a plain module at any world
    size. `ddp_kwargs` go to DistributedDataParallel unchanged.

    `comm_hook` (with `comm_hook_state`) is registered on the wrapper with DDP's
    `register_comm_hook`, which takes one hook per model: pass yours here rather than
    registering it afterwards. Without one, a job with a global elastic batch gets
    `sample_weighted_allreduce_hook`.
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
    wrapped = DistributedDataParallel(model, **ddp_kwargs)
    if comm_hook is not None:
        wrapped.register_comm_hook(comm_hook_state, comm_hook)
    elif batch_is_global():
        wrapped.register_comm_hook(wrapped.process_group, sample_weighted_allreduce_hook)
    return wrapped


def sample_weighted_allreduce_hook(
    process_group: dist.ProcessGroup | None, bucket: Any
) -> torch.futures.Future[torch.Tensor]:
    """DDP's allreduce with each rank's gradient weighted by its share of the step's samples.

    Each rank scales its gradient by n_r / n_step (its batch's samples over the step's, from
    `spotrun.train.data.step_share`) and the group sums: for a loss that is the mean over
    the rank's batch, the result is the gradient of the mean over the step's samples, as in
    the full group. With equal shares, or before the first loader with a global batch has
    handed out a batch, it divides by the world size exactly as DDP's default allreduce.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    ranks = dist.get_world_size(group)
    tensor = bucket.buffer()
    share = step_share()
    # Scaled before the sum, as DDP does, so fp16 gradients do not overflow.
    if share is None or share.samples * ranks == share.step_samples:
        tensor.div_(ranks)
    else:
        tensor.mul_(share.samples / share.step_samples)
    work = dist.all_reduce(tensor, group=group, async_op=True)
    assert work is not None  # async_op=True always returns the pending work
    return work.get_future().then(lambda fut: fut.value()[0])


# DDP checks a hook's annotations against the objects themselves (dist.GradBucket, the
# Future type); with postponed annotations they would be strings and the hook refused.
sample_weighted_allreduce_hook.__annotations__ = {
    "process_group": Any,
    "bucket": dist.GradBucket,  # type: ignore[attr-defined]
    "return": torch.futures.Future[torch.Tensor],
}
