"""Heartbeats on a worker's behalf, from its pod's launcher.

A worker's peer watch (spotrun.train.liveness) sends its heartbeats from a Python thread,
which stops while a C call keeps the interpreter lock (user code may do that for longer than
the timeout). Its node would then look silent to its peers though nothing is lost. So each
worker also hands its heartbeat (the session's token, its rank, its peers' addresses) to
its launcher in a file beside the group file, `<group file>.beats-<local rank>`, and the
launcher (a separate, light process) sends the same datagrams while the worker's process
exists. What the watch is for still shows: a node powered off, cut off or frozen stops
both, and a worker that leaves its session removes the file first (its goodbye tells the
peers it left on purpose).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spotrun.membership.groupfile import beside, read_beside, write_beside

_SUFFIX = ".beats-"
# More peers than any group has is not a heartbeat file.
_MAX_PEERS = 1 << 16
# How often the launcher looks for new, changed or removed files.
POLL_SECONDS = 0.1


def datagram(token: str, rank: int) -> bytes:
    """The heartbeat of `rank` in the session of `token`, as the peers expect it."""
    return f"{token} {rank}".encode()


@dataclass(frozen=True)
class Beats:
    """A worker's heartbeat for its launcher to send: to whom, as whom, how often."""

    token: str
    rank: int
    pid: int  # the worker's process: no heartbeat once it is gone
    interval: float
    peers: tuple[tuple[str, int], ...]

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "token": self.token,
                "rank": self.rank,
                "pid": self.pid,
                "interval": self.interval,
                "peers": [list(p) for p in self.peers],
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Beats:
        """Parses a heartbeat file; raises ValueError for anything that is not one."""
        try:
            raw = json.loads(data)
            token, rank, pid = raw["token"], raw["rank"], raw["pid"]
            interval, peers = raw["interval"], raw["peers"]
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"not a heartbeat file: {err}") from None
        if not (isinstance(token, str) and token.isalnum() and 0 < len(token) <= 128):
            raise ValueError("not a heartbeat file: the token is malformed")
        if type(rank) is not int or rank < 0 or type(pid) is not int or pid <= 0:
            raise ValueError("not a heartbeat file: rank or pid malformed")
        if type(interval) not in (int, float) or not 0.01 <= interval <= 60:
            raise ValueError("not a heartbeat file: the interval is out of range")
        if not isinstance(peers, list) or len(peers) > _MAX_PEERS:
            raise ValueError("not a heartbeat file: peers malformed")
        addresses = []
        for peer in peers:
            if not (
                isinstance(peer, list)
                and len(peer) == 2
                and isinstance(peer[0], str)
                and type(peer[1]) is int
                and 0 < peer[1] < 65536
            ):
                raise ValueError("not a heartbeat file: a peer is not [host, port]")
            addresses.append((peer[0], peer[1]))
        return cls(token, rank, pid, float(interval), tuple(addresses))


def beats_path(group_file: str, local_rank: int) -> str:
    """Where worker `local_rank` leaves its heartbeat for the launcher."""
    return beside(group_file, _SUFFIX, local_rank)


def write_beats(group_file: str, local_rank: int, beats: Beats) -> None:
    """Writes `beats` atomically (the launcher polls the folder)."""
    write_beside(group_file, _SUFFIX, local_rank, beats.to_bytes())


def remove_beats(group_file: str, local_rank: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(beats_path(group_file, local_rank))


def read_beats(group_file: str) -> list[Beats]:
    """The heartbeats the workers beside `group_file` left; unreadable ones are skipped."""
    return read_beside(group_file, _SUFFIX, Beats.from_bytes, limit=1 << 22)


def process_runs(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # The state follows the command name, which is in parentheses and may hold any byte.
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def send_beats(
    group_file: str, stop: threading.Event, runs: Callable[[int], bool] = process_runs
) -> None:
    """Sends the heartbeats the workers beside `group_file` left, each at its interval, while
    its worker's process runs, until `stop` is set (runs in a thread of the launcher)."""
    socks: dict[socket.AddressFamily, socket.socket] = {}
    due: dict[tuple[str, int], float] = {}
    try:
        while not stop.wait(POLL_SECONDS):
            now = time.monotonic()
            current = {(b.token, b.rank): b for b in read_beats(group_file) if runs(b.pid)}
            due = {key: due.get(key, now) for key in current}
            for key, beats in current.items():
                if now >= due[key]:
                    _send(socks, datagram(beats.token, beats.rank), beats.peers)
                    due[key] = now + beats.interval
    finally:
        for sock in socks.values():
            sock.close()


def _send(
    socks: dict[socket.AddressFamily, socket.socket],
    message: bytes,
    peers: Sequence[tuple[str, int]],
) -> None:
    for host, port in peers:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with contextlib.suppress(OSError):  # unreachable: its silence will tell
            sock = socks.get(family)
            if sock is None:
                sock = socks[family] = socket.socket(family, socket.SOCK_DGRAM)
            sock.sendto(message, (host, port))
