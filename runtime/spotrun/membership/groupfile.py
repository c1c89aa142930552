"""The group file: what a pod's launcher tells its live workers about the group they join next.

When the policy keeps a replica in a warm recovery (spotrun.lifecycle.group), the replica's
launcher writes this file (atomically) and its workers, waiting to re-form, read it: the
new attempt, the rendezvous address and port, and the group's size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class GroupFile:
    """What a launcher tells its live workers: the group they join next."""

    attempt: int
    master_addr: str
    master_port: int
    replicas: int
    nproc_per_node: int
    node_rank: int
    env: Mapping[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "attempt": self.attempt,
                "masterAddr": self.master_addr,
                "masterPort": self.master_port,
                "replicas": self.replicas,
                "nprocPerNode": self.nproc_per_node,
                "nodeRank": self.node_rank,
                "env": dict(self.env),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupFile:
        raw = json.loads(data)
        return cls(
            attempt=int(raw["attempt"]),
            master_addr=str(raw["masterAddr"]),
            master_port=int(raw["masterPort"]),
            replicas=int(raw["replicas"]),
            nproc_per_node=int(raw["nprocPerNode"]),
            node_rank=int(raw["nodeRank"]),
            env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
        )

    def worker_env(self, local_rank: int) -> dict[str, str]:
        """The torchrun-style variables that change for worker `local_rank` in this group."""
        return {
            **self.env,
            "SPOTRUN_ATTEMPT": str(self.attempt),
            "SPOTRUN_NODE_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "RANK": str(self.node_rank * self.nproc_per_node + local_rank),
            "WORLD_SIZE": str(self.replicas * self.nproc_per_node),
            "GROUP_RANK": str(self.node_rank),
            "GROUP_WORLD_SIZE": str(self.replicas),
            "SPOTRUN_REPLICAS": str(self.replicas),
        }


# A worker that finds members of its group silent (spotrun.train.liveness) tells its
# launcher in a file beside the group file: `<group file>.lost-<local rank>`.
_LOST_SUFFIX = ".lost-"
# More node ranks than any report names is not a report (a group has at most this many).
_MAX_NODES = 4096


@dataclass(frozen=True)
class LostReport:
    """A worker's word that node ranks `nodes` of its group's `attempt` stopped answering."""

    attempt: int
    nodes: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return json.dumps({"attempt": self.attempt, "nodes": list(self.nodes)}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LostReport:
        """Parses a report; raises ValueError for anything that is not one."""
        try:
            raw = json.loads(data)
            attempt, nodes = raw["attempt"], raw["nodes"]
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"not a lost-members report: {err}") from None
        if type(attempt) is not int or attempt < 0 or not isinstance(nodes, list):
            raise ValueError("not a lost-members report: attempt or nodes malformed")
        if len(nodes) > _MAX_NODES or any(type(n) is not int or n < 0 for n in nodes):
            raise ValueError("not a lost-members report: nodes must be node ranks")
        return cls(attempt, tuple(sorted(set(nodes))))


def lost_report_path(group_file: str, local_rank: int) -> str:
    """Where worker `local_rank` writes its LostReport."""
    return beside(group_file, _LOST_SUFFIX, local_rank)


def write_lost_report(group_file: str, local_rank: int, report: LostReport) -> None:
    """Writes `report` atomically (the launcher polls the folder)."""
    write_beside(group_file, _LOST_SUFFIX, local_rank, report.to_bytes())


def read_lost_reports(group_file: str) -> list[LostReport]:
    """The reports the workers beside `group_file` wrote; unreadable ones are skipped."""
    return read_beside(group_file, _LOST_SUFFIX, LostReport.from_bytes, limit=1 << 16)


# --- files a worker leaves beside the group file for its launcher: `<group file><suffix><local rank>`


def beside(group_file: str, suffix: str, local_rank: int) -> str:
    return f"{group_file}{suffix}{local_rank}"


def write_beside(group_file: str, suffix: str, local_rank: int, data: bytes) -> None:
    """Writes worker `local_rank`'s file atomically (the launcher polls the folder)."""
    path = beside(group_file, suffix, local_rank)
    with open(f"{path}.tmp", "wb") as handle:
        handle.write(data)
    os.replace(f"{path}.tmp", path)


def read_beside(
    group_file: str, suffix: str, parse: Callable[[bytes], T], *, limit: int
) -> list[T]:
    """Every worker's file of that kind, parsed, by local rank; unreadable ones (or ones
    `parse` refuses with ValueError) are skipped, and at most `limit` bytes are read of each."""
    folder, name = os.path.split(group_file)
    prefix = f"{name}{suffix}"
    try:
        entries = sorted(os.listdir(folder or "."))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if not entry.startswith(prefix) or entry.endswith(".tmp"):
            continue
        try:
            with open(os.path.join(folder, entry), "rb") as handle:
                found.append(parse(handle.read(limit)))
        except (OSError, ValueError):
            continue
    return found
