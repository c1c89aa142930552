"""The group file: what a pod's launcher tells its live workers about the group they join next.

When the policy keeps a replica in a warm recovery (spotrun.lifecycle.group), the replica's
launcher writes this file (atomically) and its workers, waiting to re-form, read it: the
new attempt, the rendezvous address and port, and the group's size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field


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
