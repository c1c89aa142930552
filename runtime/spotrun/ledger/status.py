"""The TrainJob status fields that the runtime owns, and the fence that guards them.

The runtime (rank 0) writes `latestCheckpoint`, `checkpoints`, `bestCheckpoints`,
`lastMetrics`, `inMemory`, `restoredFrom` and `completion`, and every member's launcher its
entry of `peerReports`; the lifecycle policy owns everything else. These pure
functions compute the new fields and the JSON patch that writes them, so the file sink of
local mode and the Kubernetes sink apply the very same change and the very same fence:
a writer of an older attempt is refused, and `latestCheckpoint.step` never goes down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spotrun.ledger.retention import Retention
from spotrun.lifecycle.times import format_time
from spotrun.store.manifest import Commit, json_metrics

RUNTIME_FIELDS = (
    "latestCheckpoint",
    "checkpoints",
    "bestCheckpoints",
    "lastMetrics",
    "completion",
    "restoredFrom",
    "inMemory",
    "peerReports",
)


class FencingError(RuntimeError):
    """The status refused a write: the writer is of an older attempt, or the ledger would go back."""


def check_fence(status: Mapping[str, Any], attempt: int, seq: int | None = None) -> None:
    """Refuses a writer of another attempt, and a checkpoint older than the recorded one.

    Checkpoints are ordered by spotrun's own sequence number (ckpt-NNNNNN), which only
    grows, never by a step or any other metric the training code reports.
    """
    current = int(status.get("attempt", 0) or 0)
    if current != attempt:
        raise FencingError(
            f"status.attempt is {current}, this writer belongs to attempt {attempt}: "
            "an older incarnation of the group may not record checkpoints"
        )
    latest = status.get("latestCheckpoint") or {}
    if seq is not None and "seq" in latest and int(latest["seq"]) > seq:
        raise FencingError(
            f"status.latestCheckpoint is ckpt-{int(latest['seq']):06d}; recording the older "
            f"ckpt-{seq:06d} would make it go down"
        )


def commit_fields(
    status: Mapping[str, Any],
    commit: Commit,
    retention: Retention,
    entries: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The runtime's status fields after `commit`, with retention applied to the lists.

    `entries` are the status entries of every committed checkpoint known (any order),
    including the new one; only those retention keeps are listed.
    """
    by_seq = {int(e["seq"]): dict(e) for e in entries}
    by_seq[commit.manifest.seq] = commit.entry()
    checkpoints = [by_seq[s] for s in sorted(by_seq) if s in retention.keep]
    best = [by_seq[s] for s in retention.best if s in by_seq]
    return {
        "latestCheckpoint": commit.entry(),
        "checkpoints": checkpoints,
        "bestCheckpoints": best,
        "lastMetrics": last_metrics(
            commit.manifest.metrics, commit.manifest.step, commit.manifest.time
        ),
    }


def resumed_fields(
    commit: Commit,
    retention: Retention,
    entries: Sequence[Mapping[str, Any]],
    replaced: str | None,
) -> dict[str, Any]:
    """The runtime's fields once an attempt resumed from `commit` instead of what the ledger named.

    `replaced` is the latestCheckpoint it passed over (it failed verification): it is kept
    as `latestCheckpoint.fellBackFrom`, which is also what lets the API server accept a
    latestCheckpoint older than the recorded one. `entries` hold only checkpoints still
    believed good, so the lists drop the corrupt ones.
    """
    fields = commit_fields({}, commit, retention, entries)
    fields.pop("lastMetrics")
    if replaced is not None:
        fields["latestCheckpoint"]["fellBackFrom"] = replaced
    return fields


def restored_from(
    tier: str,
    *,
    step: int,
    seq: int | None,
    attempt: int,
    uri: str | None,
    time: float,
    reached: int | None = None,
) -> dict[str, Any]:
    """`status.restoredFrom`: which tier (memory or bucket) an attempt's state came from.

    `seq` is the step's checkpoint number, None for a step held only in memory. `reached`
    is the newest step a member of the group reported before this attempt formed (a warm
    recovery's survivors know theirs; None when no member did): the steps lost are counted
    from it, since the progress the status holds is written at most once a second.
    """
    out: dict[str, Any] = {
        "tier": tier,
        "step": step,
        "attempt": attempt,
        "time": format_time(time),
    }
    if seq is not None:
        out["seq"] = seq
    if uri:
        out["uri"] = uri
    if reached is not None:
        out["reached"] = reached
    return out


def in_memory(step: int, *, bucket: bool, attempt: int, time: float) -> dict[str, Any]:
    """`status.inMemory`: the newest step the group holds in memory, and whether the bucket
    holds it too (a checkpoint) or only memory does (a snapshot between checkpoints)."""
    return {"step": step, "bucket": bucket, "attempt": attempt, "time": format_time(time)}


def last_metrics(metrics: Mapping[str, Any], step: int, time: float) -> dict[str, Any]:
    return {**json_metrics(metrics), "step": step, "time": format_time(time)}


def progress_fields(
    metrics: Mapping[str, Any],
    step: int,
    time: float,
    memory: Mapping[str, Any] | None,
    honoured_by: int | None = None,
) -> dict[str, Any]:
    """The fields a progress report writes: lastMetrics, and inMemory when given.

    With `honoured_by` (an attempt), also noticeHonoured: that attempt's group stopped at
    `step` for a preemption notice, and its final checkpoint, if any, is recorded.
    """
    fields: dict[str, Any] = {"lastMetrics": last_metrics(metrics, step, time)}
    if memory is not None:
        fields["inMemory"] = dict(memory)
    if honoured_by is not None:
        fields["noticeHonoured"] = {
            "attempt": honoured_by,
            "step": step,
            "time": format_time(time),
        }
    return fields


def completion(attempt: int, step: int | None, time: float) -> dict[str, Any]:
    """The training finished; `step` is None when the recorder (the launcher) cannot know it."""
    done: dict[str, Any] = {"attempt": attempt, "time": format_time(time)}
    if step is not None:
        done["step"] = step
    return done


def json_patch(
    status: Mapping[str, Any], attempt: int, fields: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """A JSON patch (RFC 6902) that writes `fields` only if the fence still holds.

    It tests `status.attempt` and, when a checkpoint is recorded, the step the writer read,
    so a concurrent write makes the whole patch fail instead of interleaving.
    """
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/status/attempt", "value": attempt}]
    latest = status.get("latestCheckpoint")
    if "latestCheckpoint" in fields and latest and "step" in latest:
        ops.append({"op": "test", "path": "/status/latestCheckpoint/step", "value": latest["step"]})
    for name, value in fields.items():
        ops.append({"op": "add", "path": f"/status/{name}", "value": value})
    return ops


def peer_report(attempt: int, nodes: Sequence[int], time: float) -> dict[str, Any]:
    """One member's entry of status.peerReports: node ranks of `attempt` that stopped answering.

    The entry names its attempt, so it needs no fence: the policy reads only the current
    attempt's reports (spotrun.lifecycle.peers).
    """
    return {"attempt": attempt, "nodes": sorted(set(nodes)), "time": format_time(time)}
