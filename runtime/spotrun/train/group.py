"""Process-group set-up: a worker's ranks, its device and the group it joins, once.

The launcher hands each worker the torchrun-style environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT); this module turns it into a process group and a
device, so training code never repeats the backend/device dance. The session calls
`init_process_group` when it starts. It imports nothing else of spotrun's training API, so
the session and `prepare_model` both build on it without importing each other.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from spotrun.contract import MASTER_ADDR, MASTER_PORT

RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
WORLD_SIZE = "WORLD_SIZE"

# A collective that waits longer than this is a hang, not a slow peer: the group is torn
# down and restarted rather than left blocked (the operator's progress deadline is longer).
DEFAULT_TIMEOUT = timedelta(minutes=10)
# CUDA tensors over NCCL, CPU tensors (spotrun's own agreement collectives) over gloo.
GPU_BACKEND = "cpu:gloo,cuda:nccl"


class ProcessGroupError(RuntimeError):
    """The worker environment cannot form a process group; the message says what to set."""


def env_rank() -> int:
    """This worker's global rank, from RANK (0 when unset: a single process)."""
    return _env_int(RANK, 0)


def env_local_rank() -> int:
    """This worker's rank within its pod, from LOCAL_RANK (0 when unset)."""
    return _env_int(LOCAL_RANK, 0)


def env_world_size() -> int:
    """The number of workers in the group, from WORLD_SIZE (1 when unset)."""
    return _env_int(WORLD_SIZE, 1)


def world_size() -> int:
    """The size of the default process group if one exists, else WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


def get_device() -> torch.device:
    """The device this worker trains on: cuda:LOCAL_RANK when that GPU exists, else cpu."""
    local_rank = env_local_rank()
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(timeout: timedelta = DEFAULT_TIMEOUT) -> str:
    """Join the default process group once, from the launcher's environment; return the backend.

    Idempotent: a second call returns the backend of the existing group. On a worker whose
    GPU (cuda:LOCAL_RANK) exists the group is "cpu:gloo,cuda:nccl": CUDA tensors go through
    NCCL, and spotrun's own small CPU collectives (the notice flag, the resume point) through
    gloo, which NCCL alone cannot carry. Elsewhere it is gloo. The CUDA device is set to
    LOCAL_RANK first, so NCCL and `torch.cuda` calls use the right GPU.
    """
    if not dist.is_available():
        raise ProcessGroupError(
            "torch.distributed is not available in this torch build; "
            "install a torch wheel with distributed support"
        )
    if dist.is_initialized():
        return str(dist.get_backend())
    required = (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)
    missing = [name for name in required if not os.environ.get(name)]
    if missing:
        raise ProcessGroupError(
            f"cannot join the process group: {', '.join(missing)} not set; "
            "start the workers with `spotrun launch` (or set the torchrun-style variables)"
        )
    device = get_device()
    if device.type != "cuda" and torch.cuda.is_available():
        # This worker would join with gloo while the others use NCCL: the group would hang.
        raise ProcessGroupError(
            f"worker LOCAL_RANK={env_local_rank()} has no GPU: this node has "
            f"{torch.cuda.device_count()} GPU(s); set nprocPerNode (--nproc-per-node) to at "
            "most that, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = GPU_BACKEND
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env_rank(),
        world_size=env_world_size(),
        timeout=timeout,
    )
    return backend


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ProcessGroupError(f"{name} must be an integer, got {raw!r}") from None
