"""Where rank 0 records what the runtime learned: the CheckpointSink, and its status.json form.

After each commit, rank 0's writer calls `record()`; the sink writes the TrainJob status
fields the runtime owns, fenced by the attempt. In local mode (and for a plain
`spotrun launch`) the status lives in `<job folder>/status.json`; on Kubernetes it is the
TrainJob's status subresource (spotrun.ledger.kube_sink).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from spotrun.ledger.retention import Retention
from spotrun.ledger.status import (
    check_fence,
    commit_fields,
    completion,
    peer_report,
    progress_fields,
    resumed_fields,
)
from spotrun.lifecycle.conditions import CHECKPOINT_CORRUPT, LEDGER_REPAIRED, set_condition
from spotrun.store import layout, storage
from spotrun.store.manifest import Commit

StatusMutation = Callable[[dict[str, Any]], None]


class CheckpointSink(Protocol):
    """What rank 0 tells the control plane: commits, progress, completion, corruption."""

    def record(
        self, commit: Commit, retention: Retention, entries: Sequence[Mapping[str, Any]]
    ) -> None:
        """Records a committed checkpoint; raises FencingError when the fence refuses it."""

    def progress(
        self,
        metrics: Mapping[str, Any],
        step: int,
        time: float,
        memory: Mapping[str, Any] | None = None,
        honoured: bool = False,
    ) -> None:
        """Records the latest metrics: the control plane's evidence that training moves.

        With `memory` (status.inMemory, see ledger.status.in_memory), also the newest step
        the group holds in memory. `honoured`: the group stopped at `step` for a
        preemption notice and its final checkpoint is recorded (status.noticeHonoured).
        """

    def completed(self, step: int | None, time: float) -> None:
        """Records that the training finished (node 0's workers all exited 0)."""

    def peers_lost(self, by: int, nodes: Sequence[int], time: float) -> None:
        """Records that replica `by` found node ranks `nodes` of its group silent.

        status.peerReports[by] (spotrun.ledger.status.peer_report), for this sink's attempt;
        each member writes only its own entry, so reports of several members never collide.
        """

    def checkpoint_corrupt(self, message: str, time: float) -> None:
        """Records that resuming skipped a corrupt checkpoint (condition CheckpointCorrupt)."""

    def restored(self, restored: Mapping[str, Any]) -> None:
        """Records where the attempt's state came from (status.restoredFrom)."""

    def resumed(
        self,
        commit: Commit,
        retention: Retention,
        entries: Sequence[Mapping[str, Any]],
        *,
        replaced: str | None,
        reason: str,
        message: str,
        time: float,
    ) -> None:
        """Moves latestCheckpoint to `commit`, the checkpoint an attempt really resumed from.

        `reason` is FellBack (what the ledger named failed verification: condition
        CheckpointCorrupt) or Rediscovered (storage held a newer committed checkpoint than the
        ledger named: condition LedgerRepaired); `replaced` is the latestCheckpoint passed over.
        """


def status_file(job_root: str) -> str:
    return layout.join(job_root, layout.STATUS_FILE)


@contextlib.contextmanager
def _locked(url: str) -> Iterator[None]:
    fs, path = storage.filesystem(url)
    if not storage.is_local(fs):
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_status_file(url: str) -> dict[str, Any]:
    try:
        raw = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return {}
    return raw if isinstance(raw, dict) else {}


# Writers of one job's status.json on a bucket: the supervisor and rank 0. A conflict means
# the other wrote in between; a few retries with jitter always get through.
_VERSION_RETRIES = 50


def update_status_file(url: str, mutate: StatusMutation) -> dict[str, Any]:
    """Read-modify-write of status.json that loses no other writer's fields; returns the new status.

    Local mode's supervisor and rank 0's writer both go through here. On local files they
    take a file lock; on a bucket with object generations (GCS) the write is conditional on
    the generation that was read, and a conflict reads again and retries.
    """
    if storage.supports_versions(url):
        for attempt in range(_VERSION_RETRIES):
            data, version = storage.read_versioned(url)
            status = _parse(data)
            mutate(status)
            try:
                storage.write_versioned(url, _encode(status), version)
                return status
            except storage.VersionConflict:
                time.sleep(random.uniform(0, 0.01 * 2 ** min(attempt, 6)))
        raise OSError(
            f"{url}: {_VERSION_RETRIES} conflicting writes in a row; is something else "
            "rewriting the job's status?"
        )
    with _locked(url):
        status = read_status_file(url)
        mutate(status)
        storage.write_bytes(url, _encode(status))
        return status


def _parse(data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {}
    raw = json.loads(data)
    return raw if isinstance(raw, dict) else {}


def _encode(status: Mapping[str, Any]) -> bytes:
    return json.dumps(status, indent=1, sort_keys=True).encode()


class FileStatusSink:
    """Writes the runtime's status fields into `<job folder>/status.json`."""

    def __init__(self, job_root: str, attempt: int) -> None:
        self.url = status_file(job_root)
        self.attempt = attempt

    def _fenced(self, seq: int | None, change: StatusMutation) -> None:
        def mutate(status: dict[str, Any]) -> None:
            status.setdefault("attempt", self.attempt)
            check_fence(status, self.attempt, seq)
            change(status)

        update_status_file(self.url, mutate)

    def record(
        self, commit: Commit, retention: Retention, entries: Sequence[Mapping[str, Any]]
    ) -> None:
        fields = commit_fields({}, commit, retention, entries)
        self._fenced(commit.manifest.seq, lambda status: status.update(fields))

    def resumed(
        self,
        commit: Commit,
        retention: Retention,
        entries: Sequence[Mapping[str, Any]],
        *,
        replaced: str | None,
        reason: str,
        message: str,
        time: float,
    ) -> None:
        fields = resumed_fields(commit, retention, entries, replaced)
        type_ = CHECKPOINT_CORRUPT if reason == "FellBack" else LEDGER_REPAIRED

        def change(status: dict[str, Any]) -> None:
            status.update(fields)
            status["conditions"] = set_condition(
                status.get("conditions", []), type_, True, reason, message, now=time
            )

        self._fenced(None, change)

    def progress(
        self,
        metrics: Mapping[str, Any],
        step: int,
        time: float,
        memory: Mapping[str, Any] | None = None,
        honoured: bool = False,
    ) -> None:
        fields = progress_fields(metrics, step, time, memory, self.attempt if honoured else None)
        self._fenced(None, lambda status: status.update(fields))

    def restored(self, restored: Mapping[str, Any]) -> None:
        self._fenced(None, lambda status: status.update(restoredFrom=dict(restored)))

    def completed(self, step: int | None, time: float) -> None:
        self._fenced(
            None, lambda status: status.update(completion=completion(self.attempt, step, time))
        )

    def peers_lost(self, by: int, nodes: Sequence[int], time: float) -> None:
        entry = peer_report(self.attempt, nodes, time)

        def mark(status: dict[str, Any]) -> None:
            reports = status.get("peerReports")
            status["peerReports"] = {
                **(reports if isinstance(reports, dict) else {}),
                str(by): entry,
            }

        update_status_file(self.url, mark)

    def checkpoint_corrupt(self, message: str, time: float) -> None:
        def mark(status: dict[str, Any]) -> None:
            status["conditions"] = set_condition(
                status.get("conditions", []),
                CHECKPOINT_CORRUPT,
                True,
                "FellBack",
                message,
                now=time,
            )

        self._fenced(None, mark)


class NullSink:
    """Records nothing: for runs that keep their status elsewhere."""

    def record(
        self, commit: Commit, retention: Retention, entries: Sequence[Mapping[str, Any]]
    ) -> None:
        return None

    def progress(
        self,
        metrics: Mapping[str, Any],
        step: int,
        time: float,
        memory: Mapping[str, Any] | None = None,
        honoured: bool = False,
    ) -> None:
        return None

    def restored(self, restored: Mapping[str, Any]) -> None:
        return None

    def completed(self, step: int | None, time: float) -> None:
        return None

    def peers_lost(self, by: int, nodes: Sequence[int], time: float) -> None:
        return None

    def checkpoint_corrupt(self, message: str, time: float) -> None:
        return None

    def resumed(
        self,
        commit: Commit,
        retention: Retention,
        entries: Sequence[Mapping[str, Any]],
        *,
        replaced: str | None,
        reason: str,
        message: str,
        time: float,
    ) -> None:
        return None


def make_sink(
    kind: str | None, *, job_root: str, attempt: int, job: str, namespace: str
) -> CheckpointSink:
    """The sink named by SPOTRUN_STATUS_SINK: `file` (default), `none`, or `module:factory`.

    `kubernetes` names spotrun.ledger.kube_sink:KubernetesSink, which the operator's pods use.
    """
    kind = kind or "file"
    if kind == "file":
        return FileStatusSink(job_root, attempt)
    if kind == "none":
        return NullSink()
    if kind == "kubernetes":
        kind = "spotrun.ledger.kube_sink:from_pod"
    module, _, name = kind.partition(":")
    if not name:
        raise ValueError(
            f"SPOTRUN_STATUS_SINK={kind!r}: expected file, none, kubernetes or module:factory"
        )
    factory = getattr(importlib.import_module(module), name)
    sink: CheckpointSink = factory(job=job, namespace=namespace, attempt=attempt, job_root=job_root)
    return sink
