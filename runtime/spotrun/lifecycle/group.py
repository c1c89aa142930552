"""`status.group`: which replicas form the group of an attempt, as the policy decided.

It names the attempt it belongs to, how the group was formed (`warm`: the survivors of the
previous attempt re-form in place with replacements; `cold`: every replica is new), the
replica indices kept from the previous attempt, the rendezvous port when the
supervisor chose one (local mode), and the warm spares promoted into the group (local
mode's `--spares`: a spare slot takes a lost node rank). Each pod's launcher watches for it
(spotrun.membership.watch) and hands a kept replica's or a promoted spare's workers their
next group.

An elastic group (spec.elastic) may run below spec.replicas: `members` then lists the
replica indices (pod ordinals) that form it, in node-rank order, and `replicas` is their
number. Without `members` the group is replicas 0 to replicas - 1, node rank = index. A
replica of the attempt that is not a member waits (its launcher's workers import and wait)
until a later group names it.

With warm spares (spec.spares: K) the job runs replicas + K pods: the group is `members`
(or 0 to replicas - 1), the other pods wait outside it, and a warm recovery puts a waiting
one in a lost member's place. Those waiting pods are in `kept` too (their pods stay).

`mtbfSeconds` is the job's mean time between interruptions when the group was formed
(`spotrun.lifecycle.ledger.observed_mtbf`): the launchers hand it to the members' checkpoint
cadences, survivors through their next group file, new pods through their environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from spotrun.lifecycle.times import positive_seconds

Mode = Literal["warm", "cold"]

# How far apart the rendezvous ports of successive attempts are from the pod contract's
# MASTER_PORT: each attempt gets a fresh TCPStore, so no member of an older group can
# reach the new one, and a survivor's old store never blocks the new one's port.
PORT_SPAN = 512


@dataclass(frozen=True)
class GroupRecord:
    """`status.group`: the membership of attempt `attempt`."""

    attempt: int
    mode: Mode
    replicas: int
    kept: tuple[int, ...] = ()
    master_port: int | None = None
    # (spare slot, node rank): spares whose waiting workers take a lost replica's place.
    promoted: tuple[tuple[int, int], ...] = ()
    # The replica indices of an elastic group, in node-rank order; () means 0..replicas-1.
    members: tuple[int, ...] = ()
    # The job's mean time between interruptions when the group was formed (None: none yet).
    mtbf_seconds: float | None = None

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attempt": self.attempt,
            "mode": self.mode,
            "replicas": self.replicas,
            "kept": list(self.kept),
        }
        if self.master_port is not None:
            out["masterPort"] = self.master_port
        if self.promoted:
            out["promoted"] = [{"spare": slot, "nodeRank": rank} for slot, rank in self.promoted]
        if self.members:
            out["members"] = list(self.members)
        if self.mtbf_seconds is not None:
            out["mtbfSeconds"] = self.mtbf_seconds
        return out

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> GroupRecord | None:
        """The record in `status` (the whole status), or None when there is none or it is bad."""
        raw = status.get("group")
        if not isinstance(raw, Mapping):
            return None
        try:
            mode: Mode = "warm" if str(raw.get("mode", "cold")) == "warm" else "cold"
            port = raw.get("masterPort")
            attempt = int(raw["attempt"])
            replicas = int(raw["replicas"])
            kept = tuple(int(i) for i in raw.get("kept") or ())
            master_port = None if port is None else int(port)
            promoted = tuple(
                (int(p["spare"]), int(p["nodeRank"])) for p in raw.get("promoted") or ()
            )
            members = tuple(int(i) for i in raw.get("members") or ())
        except (KeyError, TypeError, ValueError):
            return None
        if any(not 0 <= rank < replicas or slot < 0 for slot, rank in promoted):
            return None  # a promotion to a rank the group does not have: not ours to follow
        if members and (
            len(members) != replicas or len(set(members)) != replicas or min(members) < 0
        ):
            return None  # members that do not make a group of `replicas` ranks
        mtbf = positive_seconds(raw.get("mtbfSeconds"))  # unusable: the prior stands
        return cls(attempt, mode, replicas, kept, master_port, promoted, members, mtbf)

    def keeps(self, index: int) -> bool:
        """Whether replica `index` of the previous attempt stays, in place, in this one.

        A kept replica outside `indices` is a warm spare (spec.spares): its pod stays, its
        workers go on waiting for a group that names it.
        """
        return self.mode == "warm" and index in self.kept

    @property
    def indices(self) -> tuple[int, ...]:
        """The replica indices of the group, in node-rank order."""
        return self.members or tuple(range(self.replicas))

    def node_rank_of(self, index: int) -> int | None:
        """Replica `index`'s node rank in this group, or None when it is not a member."""
        indices = self.indices
        return indices.index(index) if index in indices else None

    def promotes(self, spare: int) -> int | None:
        """The node rank spare slot `spare` takes in this group, or None."""
        return next((rank for slot, rank in self.promoted if slot == spare), None)


def rendezvous_port(base: int, attempt: int) -> int:
    """The rendezvous port of `attempt` when the supervisor chose none: base + attempt % span."""
    return base + attempt % PORT_SPAN
