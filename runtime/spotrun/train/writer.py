"""The checkpoint writer: serialises, uploads and commits checkpoints off the training loop.

`report()` copies the state into a shared-memory snapshot buffer and returns; a separate
process per rank (not a thread: on 2 cores a thread fighting the training loop for the GIL
cost more than a synchronous save) writes the shard, and rank 0's writer commits. The
process is started with `python -m spotrun.train._writer_process` (it arms the parent-death
signal, then runs `main` here), not multiprocessing's spawn, so the user's training script
is never re-imported. The snapshot buffer is a memfd handed over
the control socket, so it is not bound by a small /dev/shm in a container.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from spotrun._orphans import die_with_parent_now
from spotrun.contract import CheckpointSettings
from spotrun.ledger.retention import Candidate, plan_retention
from spotrun.ledger.sink import CheckpointSink, make_sink
from spotrun.ledger.status import FencingError
from spotrun.store.commit import CheckpointStore, split_uri
from spotrun.store.manifest import CheckpointKind, Commit, build_manifest
from spotrun.store.tree import nbytes

log = logging.getLogger("spotrun.train.writer")

_ALIGN = 64
# How often a save waiting for the previous one asks whether to give up.
_GIVE_UP_POLL_SECONDS = 0.1
_HEADER = struct.Struct("!Q")


@dataclass(frozen=True)
class WriterConfig:
    """Everything a writer needs to know about its job, picklable for the child process."""

    root: str
    rank: int
    attempt: int
    world_size: int
    job: str
    namespace: str
    settings: CheckpointSettings = field(default_factory=CheckpointSettings)
    sink: str | None = None
    commit_timeout: float = 1800.0
    # What this attempt found at its start, for retention's accounting: the first sequence
    # number it writes, the checkpoint of its own job it resumed from (None: none), and the
    # committed checkpoints that failed verification.
    first_seq: int = 0
    resumed_seq: int | None = None
    corrupt: tuple[int, ...] = ()


@dataclass(frozen=True)
class TensorSlot:
    index: int
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    count: int


@dataclass
class _Buffer:
    """A snapshot buffer: a memfd mapped here and, under the same slot, in the writer process."""

    slot: int
    fd: int
    mapping: mmap.mmap
    view: torch.Tensor
    # Whether it is page-locked for CUDA (a state on the GPU), and whether that was tried
    # (a refusal is not asked again at every save): see WriterClient._pin.
    pinned: bool = False
    pin_tried: bool = False


class Worker:
    """Executes writer jobs; runs in the writer process, or inline for synchronous saves."""

    def __init__(self, config: WriterConfig) -> None:
        self.config = config
        self.store = CheckpointStore(config.root)
        self._sink: CheckpointSink | None = None

    @property
    def sink(self) -> CheckpointSink:
        if self._sink is None:
            c = self.config
            self._sink = make_sink(
                c.sink, job_root=c.root, attempt=c.attempt, job=c.job, namespace=c.namespace
            )
        return self._sink

    def save(
        self, seq: int, kind: CheckpointKind, skeleton: Any, tensors: Mapping[int, torch.Tensor]
    ) -> None:
        shard: dict[str, Any] = {"kind": kind, "tensors": dict(tensors)}
        if skeleton is not None:
            shard["skeleton"] = skeleton
        self.store.write_torch_shard(seq, self.config.rank, shard)

    def save_files(self, seq: int, files: Mapping[str, str], staging: str | None = None) -> None:
        try:
            self.store.write_files(seq, self.config.rank, files)
        finally:
            if staging:
                shutil.rmtree(staging, ignore_errors=True)

    def record_files(self, seq: int, paths: Sequence[str]) -> None:
        """Hashes files another library (DCP) already wrote, and marks this rank done."""
        self.store.record_existing(seq, self.config.rank, paths)

    def commit(
        self,
        *,
        seq: int,
        step: int,
        kind: CheckpointKind,
        writers: Sequence[int],
        metrics: Mapping[str, Any],
        runtime: Mapping[str, Any],
        time_: float,
    ) -> Commit:
        done = self.store.wait_for_done(seq, writers, self.config.commit_timeout)
        manifest = build_manifest(
            seq=seq,
            step=step,
            kind=kind,
            attempt=self.config.attempt,
            world_size=self.config.world_size,
            time=time_,
            done=done,
            metrics=metrics,
            runtime=runtime,
        )
        commit = self.store.commit(manifest)
        committed = self._good(self.store.committed())
        retention = plan_retention(_candidates(committed), self.config.settings)
        # The status write comes before any deletion, so the status never points at a deleted
        # checkpoint; a fenced (stale) writer deletes nothing.
        self.sink.record(commit, retention, [c.entry() for c in committed])
        for stale in retention.delete:
            if not self._accounted(stale):
                continue
            try:
                self.store.delete(stale)
            except OSError as err:  # a later commit retries retention
                log.warning("could not delete checkpoint %s yet: %s", self.store.uri(stale), err)
        self._delete_orphans()
        return commit

    def resumed(
        self,
        *,
        uri: str,
        replaced: str | None,
        corrupt: Sequence[str],
        reason: str,
        message: str,
        time: float,
    ) -> None:
        """Points the ledger at the checkpoint this attempt resumed from (see train.resume)."""
        root, seq = split_uri(uri)
        if root != self.store.root:
            # Another job's checkpoint (spec.resumeFrom): this job's ledger cannot name it.
            if reason == "FellBack":
                self.sink.checkpoint_corrupt(message, time)
            return
        manifest, sha = self.store.read_manifest(seq)
        commit = Commit(uri=uri, manifest=manifest, manifest_sha256=sha)
        bad = set(corrupt)
        committed = [c for c in self._good(self.store.committed()) if c.uri not in bad]
        retention = plan_retention(_candidates(committed), self.config.settings)
        self.sink.resumed(
            commit,
            retention,
            [c.entry() for c in committed],
            replaced=replaced,
            reason=reason,
            message=message,
            time=time,
        )

    def _good(self, committed: Sequence[Commit]) -> list[Commit]:
        """Committed checkpoints less the ones this attempt found corrupt at its start."""
        return [c for c in committed if c.manifest.seq not in self.config.corrupt]

    def _accounted(self, seq: int) -> bool:
        """Whether the ledger accounted for checkpoint seq, so retention may delete it.

        This attempt saw everything up to the checkpoint it resumed from, and writes
        everything from its first sequence number on. A checkpoint between the two was
        committed after this attempt chose where to resume (by a writer of an older
        attempt, finishing late): no ledger has named it yet, so it is kept.
        """
        c = self.config
        if seq >= c.first_seq:
            return True
        return c.resumed_seq is not None and seq <= c.resumed_seq

    def _delete_orphans(self) -> None:
        """Removes half-written checkpoints of earlier attempts: folders with no manifest.

        Only below this attempt's first sequence number: every such folder was begun by an
        attempt that has ended (or been fenced out), so nothing can still commit it.
        """
        for seq in self.store.uncommitted(below=self.config.first_seq):
            try:
                self.store.delete(seq)
                log.info("removed the half-written checkpoint %s", self.store.uri(seq))
            except OSError as err:
                log.warning("could not remove %s yet: %s", self.store.uri(seq), err)

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        if op == "save":
            return self.save(args["seq"], args["kind"], args["skeleton"], args["tensors"])
        if op == "save_files":
            return self.save_files(args["seq"], args["files"], args.get("staging"))
        if op == "record_files":
            return self.record_files(args["seq"], args["paths"])
        if op == "commit":
            commit = self.commit(**args)
            return {"uri": commit.uri, "seq": commit.manifest.seq, "step": commit.manifest.step}
        if op == "progress":
            return self.sink.progress(
                args["metrics"],
                args["step"],
                args["time"],
                args.get("memory"),
                honoured=bool(args.get("honoured")),
            )
        if op == "corrupt":
            return self.sink.checkpoint_corrupt(args["message"], args["time"])
        if op == "resumed":
            return self.resumed(**args)
        if op == "restored":
            return self.sink.restored(args["restored"])
        raise ValueError(f"unknown writer op {op!r}")


def _candidates(committed: Sequence[Commit]) -> list[Candidate]:
    return [Candidate(c.manifest.seq, c.manifest.step, c.manifest.metrics) for c in committed]


class WriterError(RuntimeError):
    """A background save or commit failed; the message carries the writer's error."""


class SaveAbandoned(Exception):
    """A save gave up waiting for the previous one (its `give_up` said so)."""


class WriterClient:
    """The training process's handle on its writer: snapshot, submit, wait."""

    def __init__(
        self, config: WriterConfig, *, background: bool = True, standby: bool = False
    ) -> None:
        self.config = config
        self.background = background
        # Keep a writer process started ahead of need for the next session (warm recovery).
        self.standby = standby
        self._inline = Worker(config)
        self._next_id = 0
        self._results: dict[int, tuple[bool, Any]] = {}
        self._cond = threading.Condition()
        # Two snapshot buffers at most: a snapshot kept only in memory (`keep`) goes into the
        # one not being uploaded, so it never waits for the bucket. The second is made on
        # the first such snapshot taken while an upload is in flight.
        self._buffers: list[_Buffer | None] = [None, None]
        self._pending_save: int | None = None
        self._uploading: int | None = None  # the slot the save in flight reads
        # The last complete snapshot: (slots, bytes used, the buffer), and its slot.
        self.snapshot: tuple[list[TensorSlot], int, mmap.mmap] | None = None
        self._newest: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._dead: str | None = None
        self._detached: set[int] = set()
        self._outstanding: set[int] = set()  # sent to the writer process, not answered yet
        self._reader: threading.Thread | None = None
        self._serving = False  # the writer process read the configuration (imports done)
        self._standby_at: float | None = None
        if background:
            self._start()

    # --- process management ----------------------------------------------------------------

    def _start(self) -> None:
        self._proc, ours = _take_recycled() or _take_standby() or _spawn_writer()
        self._sock = ours
        _send_frame(ours, pickle.dumps(self.config))
        self._reader = threading.Thread(
            target=self._read_results, name="spotrun-writer-results", daemon=True
        )
        self._reader.start()
        # The successor's writer, not at once: the recovery that started this session is
        # what needs the CPU now. Started by a later submit, from the training thread: a
        # child's parent death signal follows the thread that started it, so a short-lived
        # thread must not.
        self._standby_at = time.monotonic() + STANDBY_DELAY_SECONDS if self.standby else None

    def _read_results(self) -> None:
        assert self._sock is not None
        try:
            while True:
                kind, _ = _recv_kind(self._sock)
                if kind == b"R":
                    return  # handed on (recycle): what follows is the next client's
                if kind == b"S":
                    with self._cond:
                        self._serving = True
                    continue
                if kind != b"M":
                    raise EOFError("writer closed its socket")
                job_id, ok, value = pickle.loads(_recv_frame(self._sock))
                with self._cond:
                    self._outstanding.discard(job_id)
                    if job_id in self._detached:
                        self._detached.discard(job_id)
                        if not ok:
                            log.error("checkpoint writer: %s", value)
                        continue
                    self._results[job_id] = (ok, value)
                    self._cond.notify_all()
        except (EOFError, OSError) as err:
            with self._cond:
                self._dead = f"the checkpoint writer process exited ({err})"
                self._cond.notify_all()

    # --- jobs --------------------------------------------------------------------------------

    def submit(self, op: str, *, detached: bool = False, **args: Any) -> int:
        """Queues a job; a detached job's result is only logged, never waited for."""
        job_id = self._next_id
        self._next_id += 1
        if self._standby_at is not None and time.monotonic() >= self._standby_at:
            self._standby_at = None
            prepare_standby()
        if not self.background:
            try:
                self._results[job_id] = (True, self._inline.handle(op, args))
            except Exception as err:  # recorded, re-raised by wait()
                self._results[job_id] = (False, f"{type(err).__name__}: {err}")
            if detached:
                ok, value = self._results.pop(job_id)
                if not ok:
                    log.error("checkpoint writer: %s", value)
            return job_id
        assert self._sock is not None
        with self._cond:
            self._outstanding.add(job_id)
            if detached:
                self._detached.add(job_id)
        with self._send_lock:
            if self._dead:
                raise WriterError(self._dead)
            _send_frame(self._sock, pickle.dumps((job_id, op, args)))
        return job_id

    def wait(self, job_id: int, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while job_id not in self._results:
                if self._dead:
                    raise WriterError(self._dead)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"checkpoint writer job {job_id} still running after {timeout}s"
                    )
                self._cond.wait(remaining)
            ok, value = self._results.pop(job_id)
        if not ok:
            raise WriterError(value)
        return value

    def collect(self, job_id: int) -> bool:
        """True once `job_id` finished (a failure is logged); never blocks."""
        with self._cond:
            if job_id not in self._results:
                return False
            ok, value = self._results.pop(job_id)
        if not ok:
            log.error("a background checkpoint job failed: %s", value)
        return True

    def save(
        self,
        seq: int,
        kind: CheckpointKind,
        skeleton: Any,
        tensors: Mapping[int, torch.Tensor],
        write: Sequence[int] | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> int:
        """Snapshots `tensors` and queues the write of those in `write` (default: all).

        Returns once the snapshot is taken. The snapshot buffer keeps every tensor given,
        so a warm recovery can serve the whole state from memory while the writer uploads
        only this rank's share. One save is in flight at a time, so this first waits for
        the previous save of this rank to finish, asking `give_up()` meanwhile; once it
        says True this raises SaveAbandoned, the buffers untouched (the newest snapshot is
        still there).
        """
        chosen = None if write is None else set(write)
        if not self.background:
            mine = {i: t for i, t in tensors.items() if chosen is None or i in chosen}
            return self.submit("save", seq=seq, kind=kind, skeleton=skeleton, tensors=mine)
        self.drain_save(give_up=give_up)
        slots = self._copy_in(self._newest if self._newest is not None else 0, tensors)
        written = [s for s in slots if chosen is None or s.index in chosen]
        assert self._newest is not None
        job = self.submit(
            "save_slots", seq=seq, kind=kind, skeleton=skeleton, slots=written, buffer=self._newest
        )
        self._pending_save, self._uploading = job, self._newest
        return job

    def keep(self, tensors: Mapping[int, torch.Tensor]) -> None:
        """Snapshots `tensors` into memory only (nothing is written); never waits.

        The snapshot goes into the buffer the save in flight does not read: the newest
        snapshot's (overwritten in place) when no upload reads it, else the other one, so
        an upload of a large state goes on while the training loop keeps snapshotting.
        """
        assert self.background, "a snapshot kept in memory needs the writer process"
        busy = self._uploading if self._save_in_flight() else None
        if self._newest is not None and self._newest != busy:
            slot = self._newest
        else:
            slot = 0 if busy is None else 1 - busy
        self._copy_in(slot, tensors)

    def _save_in_flight(self) -> bool:
        with self._cond:
            return (
                self._pending_save is not None
                and self._pending_save not in self._results
                and not self._dead
            )

    def _copy_in(self, slot: int, tensors: Mapping[int, torch.Tensor]) -> list[TensorSlot]:
        """Copies `tensors` into buffer `slot`; it then holds the newest complete snapshot."""
        plan, total = _plan_slots(tensors)
        if self._newest == slot:
            self.snapshot, self._newest = None, None  # overwritten: incomplete until copied
        buffer = self._ensure_buffer(slot, total)
        if not buffer.pin_tried and any(t.is_cuda for t in tensors.values()):
            self._pin(buffer)
        copies = []
        for entry in plan:
            src = tensors[entry.index].detach()
            dst = buffer.view[entry.offset : entry.offset + entry.count * src.element_size()]
            if entry.count:
                copies.extend(_pieces(dst.view(src.dtype).view(src.shape), src))
        _copy_all(copies)
        self.snapshot, self._newest = (plan, total, buffer.mapping), slot
        return plan

    def holds(self, mapping: mmap.mmap | torch.Tensor) -> bool:
        """Whether `mapping` is one of this client's snapshot buffers."""
        return any(b is not None and b.mapping is mapping for b in self._buffers)

    def detach_snapshot(self) -> tuple[list[TensorSlot], int, mmap.mmap] | None:
        """Takes the last complete snapshot out of this client: it outlives the writer."""
        snapshot, self.snapshot = self.snapshot, None
        slot, self._newest = self._newest, None
        buffer = None if slot is None else self._buffers[slot]
        if snapshot is not None and buffer is not None and snapshot[2] is buffer.mapping:
            # The buffer now belongs to the caller (its mapping outlives the descriptor); a
            # later save allocates a new one. Unpinned first: the caller may unmap it.
            assert slot is not None
            self._unpin(buffer)
            with contextlib.suppress(OSError):
                os.close(buffer.fd)
            self._buffers[slot] = None
        return snapshot

    def drain_save(
        self, timeout: float | None = None, give_up: Callable[[], bool] | None = None
    ) -> None:
        """Waits for this rank's save in flight; with `give_up`, asks it every 0.1 s and
        raises SaveAbandoned once it says True (the save stays in flight)."""
        if self._pending_save is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while give_up is not None:
            with self._cond:
                if self._pending_save in self._results or self._dead:
                    break
            if give_up():
                raise SaveAbandoned(f"gave up waiting for save job {self._pending_save}")
            if deadline is not None and time.monotonic() >= deadline:
                break  # wait() below raises the timeout
            with self._cond:
                self._cond.wait(_GIVE_UP_POLL_SECONDS)
        job, self._pending_save = self._pending_save, None
        self._uploading = None
        self.wait(job, None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _ensure_buffer(self, slot: int, size: int) -> _Buffer:
        current = self._buffers[slot]
        if current is not None and len(current.mapping) >= size:
            return current
        size = max(size, 1 << 20)
        if current is not None:
            self._unpin(current)
            current.mapping.close()
            os.close(current.fd)
            if self._newest == slot:
                self.snapshot, self._newest = None, None
        fd = os.memfd_create("spotrun-snapshot", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size)
        buffer = _Buffer(slot, fd, mapping, torch.frombuffer(mapping, dtype=torch.uint8))
        self._buffers[slot] = buffer
        assert self._sock is not None
        with self._send_lock:
            # The kind byte carries the descriptor; the next byte names the slot.
            socket.send_fds(self._sock, [b"F" + bytes([slot])], [fd])
        return buffer

    def _pin(self, buffer: _Buffer) -> None:
        """Page-locks a snapshot buffer for CUDA, as torch.distributed.checkpoint's stager
        pins its shared memory: copies between the GPU and the buffer then run at the copy
        engines' speed, not through the driver's staging buffer (an H200: 54 against 12 GB/s,
        benchmarks/gpu_recovery.py). If CUDA refuses, the copies take the slow path."""
        buffer.pin_tried = True
        view = buffer.view
        err = int(_cudart().cudaHostRegister(view.data_ptr(), view.numel(), 1))
        if err != 0:
            log.warning("the snapshot buffer could not be pinned for CUDA (cudaError %d)", err)
            return
        buffer.pinned = True

    def _unpin(self, buffer: _Buffer) -> None:
        if not buffer.pinned:
            return
        buffer.pinned = False
        err = int(_cudart().cudaHostUnregister(buffer.view.data_ptr()))
        if err != 0:
            log.warning("the snapshot buffer could not be unpinned (cudaError %d)", err)

    def recycle(self, timeout: float = 2.0) -> bool:
        """Hands this client's writer process, if idle, to the next WriterClient of this
        process; True if so (this client is then closed).

        A warm recovery's next session would otherwise take the writer started ahead and
        start another one, an import of torch per survivor per regroup on the cores the
        recovery and the training need. A writer with a job in flight (an upload of the lost
        group, which would never commit) is not waited for: False, and the caller closes
        this client as before; nor is one still importing torch (the one started ahead
        serves the next session as soon).
        """
        proc, sock, reader = self._proc, self._sock, self._reader
        if proc is None or sock is None or reader is None or proc.poll() is not None:
            return False
        with self._cond:
            if self._outstanding or self._dead or not self._serving:
                return False  # busy, gone, or still importing: not worth waiting for
        for buffer in self._buffers:  # the next client may unmap them
            if buffer is not None:
                self._unpin(buffer)
        try:
            with self._send_lock:
                sock.sendall(b"R")
        except OSError:
            return False
        reader.join(timeout)
        if reader.is_alive() or self._dead:
            return False  # not answered: the caller's close() ends it
        self._proc, self._sock, self._reader = None, None, None
        _put_recycled(proc, sock)
        return True

    def close(self, timeout: float = 60.0) -> None:
        for buffer in self._buffers:  # they may be unmapped from now on (a snapshot kept)
            if buffer is not None:
                self._unpin(buffer)
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        try:
            if self._sock is not None:
                with self._send_lock:
                    self._sock.sendall(b"Q")
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._sock is not None:
            self._sock.close()


def _cudart() -> Any:
    return torch.cuda.cudart()  # type: ignore[no-untyped-call]


# --- a writer process started ahead of need ------------------------------------------------

# A writer process imports torch (seconds) before it serves; it reads its configuration only
# after. A warm recovery's next session (a survivor's, a promoted spare's) takes the one
# started ahead, so its first progress report and its second save do not wait for that import.
_standby: tuple[subprocess.Popen[bytes], socket.socket] | None = None
_standby_lock = threading.Lock()
# A writer process an earlier client of this process handed on (WriterClient.recycle): the
# next client takes it before the one started ahead, which then stays ahead.
_recycled: tuple[subprocess.Popen[bytes], socket.socket] | None = None
# How long after a warm session's start its successor's writer is started.
STANDBY_DELAY_SECONDS = 5.0


def _spawn_writer() -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ, SPOTRUN_WRITER_PARENT=str(os.getpid()))
    proc = subprocess.Popen(
        # Through the light entry, which dies with this process before torch is loaded.
        [sys.executable, "-m", "spotrun.train._writer_process", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    theirs.close()
    return proc, ours


def prepare_standby() -> None:
    """Starts a writer process for the next WriterClient of this process, if none waits.

    It imports, then waits for its configuration; closing this process (or its socket)
    ends it. Its environment is this one's: the configuration carries what changes. Call it
    from a thread that lives as long as the process (the training thread): the writer's
    parent death signal is tied to the thread that started it.
    """
    global _standby
    with _standby_lock:
        if _standby is None or _standby[0].poll() is not None:
            _standby = _spawn_writer()


def _put_recycled(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    global _recycled
    with _standby_lock:
        old, _recycled = _recycled, (proc, sock)
    if old is not None:  # not taken since: one idle writer is enough
        _end(*old)


def _take_recycled() -> tuple[subprocess.Popen[bytes], socket.socket] | None:
    """The writer process the previous client of this process handed on, if it still runs."""
    global _recycled
    with _standby_lock:
        taken, _recycled = _recycled, None
    return _if_running(taken)


def _if_running(
    taken: tuple[subprocess.Popen[bytes], socket.socket] | None,
) -> tuple[subprocess.Popen[bytes], socket.socket] | None:
    """`taken` if its process still runs; else its socket is closed and None."""
    if taken is not None and taken[0].poll() is not None:
        taken[1].close()
        return None
    return taken


def _end(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(b"Q")
    sock.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _take_standby() -> tuple[subprocess.Popen[bytes], socket.socket] | None:
    global _standby
    with _standby_lock:
        taken, _standby = _standby, None
    return _if_running(taken)


# The snapshot is the training loop's whole stall, so it copies on every core: large
# tensors in pieces of this many bytes, spread over a few threads (copy_ releases the GIL).
_COPY_PIECE_BYTES = 64 << 20
_COPY_THREADS = max(1, min(8, os.cpu_count() or 1))
_copy_pool: ThreadPoolExecutor | None = None


def _pieces(dst: torch.Tensor, src: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(dst, src) pairs that together copy src into dst; a large contiguous tensor is split."""
    if src.nbytes <= _COPY_PIECE_BYTES or not src.is_contiguous() or src.dim() == 0:
        return [(dst, src)]
    flat_dst, flat_src = dst.reshape(-1), src.reshape(-1)
    step = max(1, _COPY_PIECE_BYTES // src.element_size())
    return [
        (flat_dst[at : at + step], flat_src[at : at + step])
        for at in range(0, flat_src.numel(), step)
    ]


def _copy_all(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Runs the copies; on the snapshot threads (kept between saves) once they add up to
    several pieces' worth, since handing small tensors to threads costs more than it saves."""
    global _copy_pool
    total = sum(src.nbytes for _, src in copies)
    if len(copies) < 2 or total < 2 * _COPY_PIECE_BYTES or _COPY_THREADS < 2:
        for dst, src in copies:
            dst.copy_(src)
        return
    if _copy_pool is None:
        _copy_pool = ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="spotrun-snapshot")
    for future in [_copy_pool.submit(dst.copy_, src) for dst, src in copies]:
        future.result()


def _plan_slots(tensors: Mapping[int, torch.Tensor]) -> tuple[list[TensorSlot], int]:
    slots = []
    offset = 0
    for index in sorted(tensors):
        tensor = tensors[index]
        slots.append(TensorSlot(index, offset, tensor.dtype, tuple(tensor.shape), tensor.numel()))
        offset += -(-nbytes(tensor) // _ALIGN) * _ALIGN
    return slots, offset


# --- the wire: a kind byte, then for messages an 8-byte length and a pickle ------------------


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(b"M" + _HEADER.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the writer socket")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _recv_kind(sock: socket.socket) -> tuple[bytes, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, 1, 4)
    if not data:
        raise EOFError("peer closed the writer socket")
    return data, list(fds)


def _recv_frame(sock: socket.socket) -> bytes:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return _recv_exact(sock, size)


# --- the child process ------------------------------------------------------------------


def _serve(sock: socket.socket) -> None:
    """Serves one client's configuration after another, until Q (or the socket closes)."""
    while _recv_kind(sock)[0] == b"M":
        config: WriterConfig = pickle.loads(_recv_frame(sock))
        worker = Worker(config)
        sock.sendall(b"S")  # serving: its imports are done
        if not _serve_client(sock, worker):
            return


def _serve_client(sock: socket.socket, worker: Worker) -> bool:
    """One client's jobs; True when it hands this process on (R), False when it ends it (Q)."""
    buffers: dict[int, mmap.mmap] = {}
    while True:
        kind, fds = _recv_kind(sock)
        if kind in (b"Q", b"R"):
            for mapping in buffers.values():
                try:
                    mapping.close()
                except BufferError:  # a view still lives: the mapping goes with it
                    log.warning("a snapshot buffer was still in use when its client left")
            if kind == b"R":
                sock.sendall(b"R")  # the old client's reader stops here
            return kind == b"R"
        if kind == b"F":
            slot = _recv_exact(sock, 1)[0]
            if slot in buffers:
                buffers.pop(slot).close()
            buffers[slot] = mmap.mmap(fds[0], os.fstat(fds[0]).st_size)
            os.close(fds[0])
            continue
        job_id, op, args = pickle.loads(_recv_frame(sock))
        try:
            if op == "save_slots":
                result = _save_slots(worker, buffers, args)
            else:
                result = worker.handle(op, args)
            reply = (job_id, True, result)
        except FencingError as err:
            log.error("checkpoint refused by the status fence: %s", err)
            reply = (job_id, False, f"FencingError: {err}")
        except Exception as err:
            log.exception("checkpoint writer job %s (%s) failed", job_id, op)
            reply = (job_id, False, f"{type(err).__name__}: {err}")
        _send_frame(sock, pickle.dumps(reply))


def _save_slots(worker: Worker, buffers: Mapping[int, mmap.mmap], args: dict[str, Any]) -> Any:
    """A save read from a snapshot buffer; its views of the buffer end with this call."""
    buffer = buffers.get(args.pop("buffer", 0))
    assert buffer is not None, "no snapshot buffer was handed over"
    tensors = {
        s.index: torch.frombuffer(buffer, dtype=s.dtype, count=s.count, offset=s.offset).view(
            s.shape
        )
        if s.count
        else torch.empty(s.shape, dtype=s.dtype)
        for s in args.pop("slots")
    }
    return worker.handle("save", {**args, "tensors": tensors})


def main() -> None:
    die_with_parent_now(int(os.environ.get("SPOTRUN_WRITER_PARENT", os.getppid())))
    # A group-wide SIGTERM must not kill the final checkpoint's upload; the writer dies
    # with its training process instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="[spotrun writer] %(levelname)s %(message)s")
    torch.set_num_threads(1)
    sock = socket.socket(fileno=int(sys.argv[1]))
    with contextlib.suppress(EOFError):
        _serve(sock)


if __name__ == "__main__":
    main()
