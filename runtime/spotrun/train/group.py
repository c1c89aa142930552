"""Process-group set-up: a worker's ranks, its device and the group it joins, once.

The launcher hands each worker the torchrun-style environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT); this module turns it into a process group and a
device, so training code never repeats the backend/device dance. The session calls
`init_process_group` when it starts. It imports nothing else of spotrun's training API, so
the session and `prepare_model` both build on it without importing each other.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]  # exported at run time

from spotrun.contract import MASTER_ADDR, MASTER_PORT

RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
WORLD_SIZE = "WORLD_SIZE"

# A collective that waits longer than this is a hang, not a slow peer: the group is torn
# down and restarted rather than left blocked (the operator's progress deadline is longer).
DEFAULT_TIMEOUT = timedelta(minutes=10)
# CUDA tensors over NCCL, CPU tensors (spotrun's own agreement collectives) over gloo.
GPU_BACKEND = "cpu:gloo,cuda:nccl"


class ProcessGroupError(RuntimeError):
    """The worker environment cannot form a process group; the message says what to set."""


class RendezvousAbandoned(RuntimeError):
    """The group this worker was joining was given up (a newer one is published)."""


# The key every member adds itself to in the rendezvous of an abandonable group.
_JOINED = "spotrun/joined"
# The file descriptors the current group opened (gloo's connections to its peers, the
# store's client): what `abort_connections` shuts down.
_opened: list[int] = []
# The peer watch (spotrun.train.liveness) aborts from its own thread.
_opened_lock = threading.Lock()


def env_rank() -> int:
    """This worker's global rank, from RANK (0 when unset: a single process)."""
    return _env_int(RANK, 0)


def env_local_rank() -> int:
    """This worker's rank within its pod, from LOCAL_RANK (0 when unset)."""
    return _env_int(LOCAL_RANK, 0)


def env_world_size() -> int:
    """The number of workers in the group, from WORLD_SIZE (1 when unset)."""
    return _env_int(WORLD_SIZE, 1)


def world_size() -> int:
    """The size of the default process group if one exists, else WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


def get_device() -> torch.device:
    """The device this worker trains on: cuda:LOCAL_RANK when that GPU exists, else cpu."""
    local_rank = env_local_rank()
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(
    timeout: timedelta = DEFAULT_TIMEOUT, abandon: Callable[[], bool] | None = None
) -> str:
    """Join the default process group once, from the launcher's environment; return the backend.

    Idempotent: a second call returns the backend of the existing group. On a worker whose
    GPU (cuda:LOCAL_RANK) exists the group is "cpu:gloo,cuda:nccl": CUDA tensors go through
    NCCL, and spotrun's own small CPU collectives (the notice flag, the resume point) through
    gloo, which NCCL alone cannot carry. Elsewhere it is gloo. The CUDA device is set to
    LOCAL_RANK first, so NCCL and `torch.cuda` calls use the right GPU.

    With `abandon`, the rendezvous can be given up: while members are missing it asks
    `abandon()` every 10 ms and raises RendezvousAbandoned once it says True (a warm group
    re-formed without the member this one waits for; a blocking rendezvous would hold this
    worker until the timeout).
    """
    if not dist.is_available():
        raise ProcessGroupError(
            "torch.distributed is not available in this torch build; "
            "install a torch wheel with distributed support"
        )
    if dist.is_initialized():
        return str(dist.get_backend())
    required = (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)
    missing = [name for name in required if not os.environ.get(name)]
    if missing:
        raise ProcessGroupError(
            f"cannot join the process group: {', '.join(missing)} not set; "
            "start the workers with `spotrun launch` (or set the torchrun-style variables)"
        )
    device = get_device()
    if device.type != "cuda" and torch.cuda.is_available():
        # This worker would join with gloo while the others use NCCL: the group would hang.
        raise ProcessGroupError(
            f"worker LOCAL_RANK={env_local_rank()} has no GPU: this node has "
            f"{torch.cuda.device_count()} GPU(s); set nprocPerNode (--nproc-per-node) to at "
            "most that, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = GPU_BACKEND
    else:
        backend = "gloo"
    before = _open_fds()
    if abandon is None:
        if env_rank() != 0:
            deadline = time.monotonic() + timeout.total_seconds()
            wait_for_listener(
                os.environ[MASTER_ADDR],
                _env_int(MASTER_PORT, 0),
                give_up=lambda: time.monotonic() > deadline,
            )
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=env_rank(),
            world_size=env_world_size(),
            timeout=timeout,
        )
    else:
        store = _rendezvous(env_rank(), env_world_size(), timeout, abandon)
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=env_rank(),
            world_size=env_world_size(),
            timeout=timeout,
        )
    with _opened_lock:
        _opened[:] = sorted(_open_fds() - before)
    return backend


def _joined(store: TCPStore) -> int:
    """How many members joined; -1 once rank 0's store went (its group is being given up)."""
    try:
        return int(store.add(_JOINED, 0))
    except RuntimeError:
        return -1


def abort_connections() -> int:
    """Shuts down the current group's TCP connections; returns how many.

    When a member is lost, only its neighbours' collectives fail: in a ring, a member whose
    left neighbour errored out (alive, no longer sending) waits in gloo until the group's
    timeout, and leaving or destroying the process group closes nothing while gloo holds
    it. Shutting down this member's connections (not closing them: gloo still owns the
    descriptors) makes every pending read on the other side fail at once, so the failure
    travels around the group in milliseconds. Listening sockets are left alone (gloo
    aborts the process if its listener fails). Call it before the group is left, never
    after: the descriptors may then be reused. NCCL's own connections are not touched.
    Safe from any thread.
    """
    with _opened_lock:
        count = _shut_down(_opened)
        _opened.clear()
    return count


def _shut_down(fds: list[int]) -> int:
    count = 0
    for fd in fds:
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # closed meanwhile, or not a socket
        with sock:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or listening:
                continue
            if sock.type != socket.SOCK_STREAM:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                count += 1
    return count


def _open_fds() -> set[int]:
    try:
        return {int(name) for name in os.listdir("/proc/self/fd")}
    except OSError:  # no /proc: nothing to abort later
        return set()


def wait_for_listener(host: str, port: int, give_up: Callable[[], bool]) -> bool:
    """Returns True once `host:port` accepts a TCP connection, False once `give_up()` says so.

    A member that reaches the rendezvous before rank 0's store listens (a promoted spare, a
    survivor re-forming its group, a pod of a cold restart that started first) would have
    its connection refused, and TCPStore's client retries only after a backoff of about
    0.3 s. Polling with a plain connection first (from 10 ms apart, growing to 100 ms, so an
    address that does not resolve yet costs few DNS queries) joins within milliseconds of
    the store coming up; the store's own connect then succeeds at once.
    """
    pause = 0.01
    while not give_up():
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:  # refused, unreachable, or the name does not resolve (yet)
            time.sleep(pause)
            pause = min(0.1, pause * 1.3)
    return False


def _rendezvous(rank: int, world: int, timeout: timedelta, abandon: Callable[[], bool]) -> TCPStore:
    """The TCPStore of a group every member joined, polled so that it can be given up."""
    host, port = os.environ[MASTER_ADDR], _env_int(MASTER_PORT, 0)
    deadline = time.monotonic() + timeout.total_seconds()
    store: TCPStore | None = None
    if rank != 0:
        wait_for_listener(host, port, give_up=lambda: abandon() or time.monotonic() > deadline)
    while store is None:
        try:
            store = TCPStore(
                host,
                port,
                world,
                is_master=rank == 0,
                timeout=timedelta(seconds=1),
                wait_for_workers=False,
            )
        except RuntimeError:  # rank 0's store is not up (yet, or at all)
            if abandon():
                raise RendezvousAbandoned(f"the group at {host}:{port} was given up") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    store.set_timeout(timeout)
    store.add(_JOINED, 1)
    while (joined := _joined(store)) < world:
        if abandon() or time.monotonic() > deadline:
            store = None  # rank 0 closes its server now, not when the traceback goes
            if time.monotonic() > deadline:
                raise ProcessGroupError(
                    f"rendezvous at {host}:{port}: {joined} of {world} workers joined "
                    f"within {timeout.total_seconds():g}s"
                )
            raise RendezvousAbandoned(
                f"the group at {host}:{port} was given up with {joined} of {world} joined"
            )
        # Every warm group forms here, so a recovery pays this poll: 10 ms, one store add.
        time.sleep(0.01)
    return store


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ProcessGroupError(f"{name} must be an integer, got {raw!r}") from None
