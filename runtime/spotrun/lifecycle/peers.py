"""Members that their peers report silent: lost without notice, though their pods still run.

A node that vanishes without notice (powered off, cut off by a partition) closes none of its
connections, so neither its peers' collectives nor its pod say it is gone; the node is
declared NotReady only after the node controller's grace (40 s on a default cluster), and a
partition that leaves the kubelet talking to the API server never is. The workers of a warm
group watch each other (spotrun.train.liveness), and each member's launcher records which
node ranks of its attempt went silent in `status.peerReports[<its index>]`. Here those
reports become facts of the observation: the reported replicas are preempted
(`PeerUnresponsive`) and unresponsive, so the policy restarts warm without them at once and
waits for no final checkpoint from them.

Only reports of the current attempt count, only from a member of that group that runs and
is not reported itself, and only about a member that runs and carries no other loss. When
two members report each other (a partition between them), reporters are read in index
order, so the lower index is believed: one side is kept, deterministically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from spotrun.lifecycle.group import GroupRecord
from spotrun.lifecycle.observation import Observation, ReplicaObservation

PEER_UNRESPONSIVE = "PeerUnresponsive"
REPORTS = "peerReports"


def reported(status: Mapping[str, Any], replicas: int) -> dict[int, tuple[int, ...]]:
    """The current attempt's reports: {reporter index: reported replica indices}, in index order.

    Node ranks map to replica indices through `status.group` of that attempt (else node
    rank = index, a group of `replicas`); entries that do not parse are ignored.
    """
    raw = status.get(REPORTS)
    if not isinstance(raw, Mapping):
        return {}
    attempt = status.get("attempt")
    record = GroupRecord.from_status(status)
    members = (
        record.indices
        if record is not None and record.attempt == attempt
        else tuple(range(replicas))
    )
    out: dict[int, tuple[int, ...]] = {}
    for key, entry in raw.items():
        if not (isinstance(key, str) and key.isdigit()) or not isinstance(entry, Mapping):
            continue
        nodes = entry.get("nodes")
        if entry.get("attempt") != attempt or not isinstance(nodes, Sequence):
            continue
        by = int(key)
        lost = {
            members[node]
            for node in nodes
            if type(node) is int and 0 <= node < len(members) and members[node] != by
        }
        if by in members and lost:
            out[by] = tuple(sorted(lost))
    return dict(sorted(out.items()))


def unresponsive(status: Mapping[str, Any], observation: Observation, replicas: int) -> set[int]:
    """The replicas of the current attempt that peers credibly report silent."""
    attempt = status.get("attempt")
    seen = {r.index: r for r in observation.replicas if r.attempt == attempt}
    accused: set[int] = set()
    for by, lost in reported(status, replicas).items():
        if by in accused or not _runs(seen.get(by)):
            continue
        accused.update(i for i in lost if _runs(seen.get(i)) and not seen[i].preempted)
    return accused


def mark(status: Mapping[str, Any], observation: Observation, replicas: int) -> Observation:
    """`observation` with the replicas peers report silent flagged preempted and unresponsive."""
    silent = unresponsive(status, observation, replicas)
    if not silent:
        return observation
    attempt = status.get("attempt")

    def flagged(r: ReplicaObservation) -> ReplicaObservation:
        if r.attempt != attempt or r.index not in silent:
            return r
        return dataclasses.replace(
            r,
            preempted=True,
            preemption_reason=PEER_UNRESPONSIVE,
            unresponsive=True,
            message=r.message or "its peers report it silent (no answer to their heartbeats)",
        )

    return dataclasses.replace(
        observation, replicas=tuple(flagged(r) for r in observation.replicas)
    )


def _runs(replica: ReplicaObservation | None) -> bool:
    return replica is not None and replica.phase == "running" and replica.present
