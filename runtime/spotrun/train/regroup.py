"""Warm recovery in a worker: keep the process, re-form the group, restore state from memory.

When a member of the group is lost, the survivors' collectives fail (gloo and NCCL notice a
closed peer at once) or, after a preemption notice agreed by the group, the survivors stop
at the final checkpoint's step (`Regroup`). Instead of exiting, a survivor waits for its
launcher to hand it the next group (a GroupFile: the new attempt, its rendezvous port),
re-forms the process group in the same process, and runs the training again. The newest
state comes from memory: every rank keeps a full copy of its last snapshot (the writer's
snapshot buffer), and the start of the next session sends it to the members that lack it
(the replacement) over the new group, in one contiguous buffer. Nothing received is
unpickled unsafely: the structure travels as a `torch.save` payload loaded with
`weights_only=True`, the tensor table as JSON checked against the received size.
"""

from __future__ import annotations

import io
import json
import logging
import mmap
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from spotrun import contract
from spotrun.membership.groupfile import GroupFile

log = logging.getLogger("spotrun")

# The launcher writes the group file here, and each worker acknowledges the attempt it joins
# beside it, so the launcher can tell a worker stuck in a collective.
GROUP_FILE_ENV = contract.GROUP_FILE
RECOVERY_ENV = contract.RECOVERY
# How long a survivor waits for the next group before it gives up (and exits failed).
REGROUP_WAIT_ENV = "SPOTRUN_REGROUP_WAIT_SECONDS"
DEFAULT_REGROUP_WAIT = 120.0
# Pieces of the state sent between peers: gloo carries one tensor per message.
_PIECE_BYTES = 64 << 20

_DTYPES = {
    str(d): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}


class Regroup(BaseException):
    """This worker survives a lost member: unwind the training and wait for the next group.

    A BaseException, so the training code's `except Exception` does not swallow it.
    """


def warm_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether this worker's launcher can regroup it (SPOTRUN_RECOVERY=warm and a group file)."""
    env = os.environ if env is None else env
    return env.get(RECOVERY_ENV, "") == "warm" and bool(env.get(GROUP_FILE_ENV))


def is_group_failure(err: BaseException) -> bool:
    """Whether `err` says a peer of the group went away (not a bug of the training code)."""
    if isinstance(err, Regroup):
        return True
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    if not isinstance(err, RuntimeError):
        return False
    text = str(err)
    return any(
        marker in text
        for marker in (
            "Connection closed by peer",
            "Connection reset by peer",
            "gloo/transport",
            "NCCL communicator was aborted",
            "ncclRemoteError",
            "Broken pipe",
        )
    )


def wait_for_group(
    attempt: int, timeout: float | None = None, stop: Callable[[], bool] = lambda: False
) -> GroupFile | None:
    """The next group (an attempt above `attempt`) once the launcher writes it, else None.

    Gives up early when `stop()` turns true (this worker got a preemption notice itself).
    """
    path = os.environ.get(GROUP_FILE_ENV)
    if not path:
        return None
    if timeout is None:
        timeout = float(os.environ.get(REGROUP_WAIT_ENV, DEFAULT_REGROUP_WAIT))
    deadline = time.monotonic() + timeout
    while True:
        group = read_group(path)
        if group is not None and group.attempt > attempt:
            return group
        if stop() or time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def read_group(path: str) -> GroupFile | None:
    try:
        with open(path, "rb") as handle:
            return GroupFile.from_bytes(handle.read())
    except (FileNotFoundError, ValueError, KeyError):
        return None


class NextGroupProbe:
    """Whether the launcher published a group newer than `attempt`: a stat per call.

    A live group learns so that it is being resized (an elastic group growing back): it
    re-forms at its next checkpoint. A worker in a rendezvous learns so that the group it
    waits for was given up (an elastic group shrinking without the member it waits for).
    """

    def __init__(self, attempt: int, path: str | None = None) -> None:
        self.attempt = attempt
        self.path = path if path is not None else os.environ.get(GROUP_FILE_ENV, "")
        self._mark: tuple[int, int] | None = None
        self._newer = False

    def published(self) -> bool:
        if not self.path:
            return False
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return False
        mark = (info.st_ino, info.st_mtime_ns)
        if mark != self._mark:
            self._mark = mark
            group = read_group(self.path)
            self._newer = group is not None and group.attempt > self.attempt
        return self._newer


def acknowledge(group: GroupFile, local_rank: int) -> None:
    """Tells the launcher this worker is joining `group` (it is not stuck in a collective)."""
    path = os.environ.get(GROUP_FILE_ENV)
    if path:
        with open(f"{path}.ack-{local_rank}", "w") as handle:
            handle.write(str(group.attempt))


def rejoin(group: GroupFile) -> None:
    """Leaves the old process group and sets the environment of the next one."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # the old group is broken; only its resources remain
            log.warning("could not tear down the old process group cleanly: %s", err)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.environ.update(group.worker_env(local_rank))
    os.environ.pop(contract.SPARE, None)  # a promoted spare is a member now
    acknowledge(group, local_rank)


def wait_for_promotion(stop: Callable[[], bool] = lambda: False) -> GroupFile | None:
    """A warm spare's workers: the group that promotes their slot, once the launcher writes it.

    Waits without a deadline (a spare may wait the whole job); None only when `stop()`.
    """
    attempt = int(os.environ.get(contract.ATTEMPT, "0"))
    return wait_for_group(attempt, timeout=float("inf"), stop=stop)


def is_spare(env: Mapping[str, str] | None = None) -> bool:
    """This process belongs to a warm spare (it waits to be promoted into a group)."""
    env = os.environ if env is None else env
    return bool(env.get(contract.SPARE)) and warm_enabled(env)


# --- the state kept in memory ---------------------------------------------------------------


@dataclass
class Slot:
    """Where one tensor of a snapshot lies in its buffer."""

    index: int
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "offset": self.offset,
            "dtype": str(self.dtype),
            "shape": list(self.shape),
            "count": self.count,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], size: int) -> Slot:
        dtype = _DTYPES.get(str(raw["dtype"]))
        if dtype is None:
            raise ValueError(f"a peer sent a tensor of unknown dtype {raw['dtype']!r}")
        shape = tuple(int(d) for d in raw["shape"])
        count = int(raw["count"])
        offset = int(raw["offset"])
        numel = 1
        for d in shape:
            numel *= d
        if (
            min((offset, count, *shape), default=0) < 0
            or numel != count
            or offset + count * _itemsize(dtype) > size
        ):
            raise ValueError(f"a peer sent a tensor table entry outside its buffer: {dict(raw)}")
        return cls(int(raw["index"]), offset, dtype, shape, count)


@dataclass
class MemorySnapshot:
    """A rank's newest complete snapshot: the whole (replicated) state at `step`.

    `seq` is the step's checkpoint number when the bucket holds the step too (`in_bucket`);
    for a step kept only in memory it is the newest checkpoint number begun before it (-1:
    none), which is what retention accounts from after a recovery from it.
    """

    seq: int
    step: int
    skeleton: Any
    slots: list[Slot]
    buffer: mmap.mmap | torch.Tensor
    size: int
    metrics: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    in_bucket: bool = True

    def view(self) -> torch.Tensor:
        if isinstance(self.buffer, torch.Tensor):
            return self.buffer
        return torch.frombuffer(self.buffer, dtype=torch.uint8, count=self.size)

    def tensors(self, *, copy: bool) -> dict[int, torch.Tensor]:
        """The snapshot's tensors by index: copies, or views into the buffer."""
        view = self.view()
        out = {}
        for slot in self.slots:
            if slot.count == 0:
                out[slot.index] = torch.empty(slot.shape, dtype=slot.dtype)
                continue
            nbytes = slot.count * _itemsize(slot.dtype)
            piece = view[slot.offset : slot.offset + nbytes].view(slot.dtype).view(slot.shape)
            out[slot.index] = piece.clone() if copy else piece
        return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- agreement and transfer at the start of a session ------------------------------------------


@dataclass(frozen=True)
class Holding:
    """What one rank brings to a new group."""

    step: int  # -1: no snapshot in memory
    seq: int
    highest_seq: int  # the highest checkpoint number this rank has begun writing (-1: none)
    # The newest step this process reported in an earlier group (a survivor's); -1: none.
    reached: int = -1


def gather_holdings(mine: Holding, world_size: int) -> list[Holding]:
    """Every rank's Holding, by rank (one all_gather of small integers)."""
    local = torch.tensor([mine.step, mine.seq, mine.highest_seq, mine.reached], dtype=torch.int64)
    if world_size == 1:
        return [mine]
    out = [torch.zeros(4, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(out, local)
    return [Holding(int(t[0]), int(t[1]), int(t[2]), int(t[3])) for t in out]


def choose_source(holdings: Sequence[Holding]) -> tuple[int, list[int]] | None:
    """(the rank that serves the newest snapshot, the ranks that lack it), or None if no rank
    holds one. Ties go to the lowest rank, so every rank computes the same answer."""
    best = max((h.step for h in holdings), default=-1)
    if best < 0:
        return None
    source = min(r for r, h in enumerate(holdings) if h.step == best)
    best_seq = holdings[source].seq
    needy = [r for r, h in enumerate(holdings) if not (h.step == best and h.seq == best_seq)]
    return source, needy


def send_snapshot(snapshot: MemorySnapshot, to: Sequence[int]) -> None:
    """Sends the snapshot to ranks `to`: a header, then the buffer in pieces."""
    structure = io.BytesIO()
    torch.save(snapshot.skeleton, structure)
    header = json.dumps(
        {
            "seq": snapshot.seq,
            "step": snapshot.step,
            "in_bucket": snapshot.in_bucket,
            "size": snapshot.size,
            "slots": [s.to_json() for s in snapshot.slots],
            "metrics": snapshot.metrics,
            "runtime": snapshot.runtime,
        }
    ).encode()
    view = snapshot.view()
    for rank in to:
        _send_bytes(header, rank)
        _send_bytes(structure.getvalue(), rank)
        for at in range(0, snapshot.size, _PIECE_BYTES):
            dist.send(view[at : at + _PIECE_BYTES], rank)


def receive_snapshot(source: int) -> MemorySnapshot:
    """Receives a snapshot from `source` and checks it before anything is built from it."""
    header = json.loads(_recv_bytes(source))
    structure = _recv_bytes(source)
    size = int(header["size"])
    if size < 0:
        raise ValueError(f"rank {source} sent a snapshot of negative size")
    buffer = torch.empty(size, dtype=torch.uint8)
    for at in range(0, size, _PIECE_BYTES):
        dist.recv(buffer[at : at + _PIECE_BYTES], source)
    slots = [Slot.from_json(raw, size) for raw in header["slots"]]
    skeleton = torch.load(io.BytesIO(structure), weights_only=True)
    return MemorySnapshot(
        seq=int(header["seq"]),
        step=int(header["step"]),
        skeleton=skeleton,
        slots=slots,
        buffer=buffer,
        size=size,
        metrics=dict(header.get("metrics") or {}),
        runtime=dict(header.get("runtime") or {}),
        in_bucket=header.get("in_bucket") is not False,
    )


def _send_bytes(data: bytes, rank: int) -> None:
    dist.send(torch.tensor([len(data)], dtype=torch.int64), rank)
    if data:
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), rank)


def _recv_bytes(rank: int, limit: int = 1 << 30) -> bytes:
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, rank)
    n = int(size.item())
    if not 0 <= n <= limit:
        raise ValueError(f"rank {rank} announced a message of {n} bytes")
    if n == 0:
        return b""
    data = torch.empty(n, dtype=torch.uint8)
    dist.recv(data, rank)
    return data.numpy().tobytes()


def broadcast_json(value: Any, src: int, world_size: int) -> Any:
    """Broadcasts a JSON-able value from `src` (JSON, not pickle: a peer's bytes are data)."""
    if world_size == 1:
        return value
    rank = dist.get_rank()
    data = json.dumps(value).encode() if rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src)
    buffer = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if rank == src
        else torch.empty(int(size.item()), dtype=torch.uint8)
    )
    if int(size.item()):
        dist.broadcast(buffer, src)
    return json.loads(buffer.numpy().tobytes()) if rank != src else value
