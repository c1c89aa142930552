"""Names inside a job's checkpoint folder, so every reader and writer agrees on them.

<storage>/<namespace>/<job>/ckpt-000012/rank-00000.pt
                                        rank-00000.done.json
                                        manifest.json
"""

from __future__ import annotations

import os
import re

DEFAULT_STORAGE = "spotrun-runs"

CHECKPOINT_PREFIX = "ckpt-"
MANIFEST = "manifest.json"
STATUS_FILE = "status.json"
_CHECKPOINT_RE = re.compile(r"^ckpt-(\d{6,})$")


def join(url: str, *parts: str) -> str:
    """Joins URL path parts with single slashes; URLs stay strings (they are not local paths)."""
    out = url.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def resolve_storage(storage: str) -> str:
    """The storage URL to use: the given one, else `./spotrun-runs` made absolute."""
    return storage or os.path.abspath(DEFAULT_STORAGE)


def job_root(storage: str, namespace: str, job: str) -> str:
    return join(resolve_storage(storage), namespace, job)


def checkpoint_name(seq: int) -> str:
    if seq < 0:
        raise ValueError(f"checkpoint sequence numbers start at 0, got {seq}")
    return f"{CHECKPOINT_PREFIX}{seq:06d}"


def parse_checkpoint_name(name: str) -> int | None:
    """The sequence number of a `ckpt-NNNNNN` folder name (a full URL works too), else None."""
    match = _CHECKPOINT_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def shard_dir_name(rank: int) -> str:
    return f"rank-{rank:05d}"


def done_name(rank: int) -> str:
    return f"rank-{rank:05d}.done.json"
