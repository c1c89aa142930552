"""Sharded state (FSDP, DTensor) through torch.distributed.checkpoint, under the commit rule.

DCP writes the files (one per rank plus `.metadata`) into `<checkpoint>/dcp/` through
fsspec; spotrun then hashes each rank's files into its `.done` and rank 0 commits the
manifest as for any other checkpoint. DCP's own metadata lets a checkpoint saved by N
ranks load onto M.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from spotrun.store import layout, storage

DCP_DIR = "dcp"


def save(checkpoint_uri: str, state_dict: Mapping[str, Any], rank: int) -> list[str]:
    """Saves with DCP (a collective); returns the paths, relative to the checkpoint, rank wrote."""
    url = layout.join(checkpoint_uri, DCP_DIR)
    writer = FsspecWriter(url, single_file_per_rank=True, **storage.fsspec_options(url))
    dcp_save(dict(state_dict), storage_writer=writer)
    if dist.is_initialized():
        dist.barrier()  # every rank's files exist before anyone lists them
    mine = [n for n in storage.list_names(url) if n.startswith(f"__{rank}_")]
    if rank == 0:
        mine.append(".metadata")
    return [f"{DCP_DIR}/{name}" for name in sorted(mine)]


def load(checkpoint_uri: str, state_dict: dict[str, Any]) -> None:
    url = layout.join(checkpoint_uri, DCP_DIR)
    dcp_load(state_dict, storage_reader=FsspecReader(url, **storage.fsspec_options(url)))
