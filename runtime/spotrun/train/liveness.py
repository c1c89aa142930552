"""The peer watch: members of a warm group that stop answering are reported, not waited for.

A member whose node vanishes without notice (powered off, cut off by a partition) closes none
of its connections: its peers' gloo collectives wait for the group's timeout (10 minutes),
and the control plane learns of the loss only when the node is declared NotReady (40 s on a
default cluster), or never (a partition that leaves the kubelet talking). So every worker of
a warm group sends a small UDP datagram to the workers of the other nodes every `interval`,
and counts a node none of whose workers it heard from for `timeout` as lost: it tells its
launcher (a LostReport beside the group file; the launcher records it in status.peerReports,
where the policy reads it, spotrun.lifecycle.peers) and shuts down its own group's
connections, so its collective fails now and it waits for the next group as after any loss.

The addresses travel through the group's store once, when a session starts (every member is
there: it follows the start-up agreement). A datagram carries a token rank 0 drew for the
session and the sender's rank; anything else is ignored. A forged datagram can only keep a
silent member counted alive, which is what happens without the watch: silence is the only
evidence of a loss. A worker that leaves on purpose (its session ends, a regroup at an agreed
step) says goodbye first, so its peers do not count its silence.

Why UDP and not the group's TCPStore (torchelastic's keep-alive): every store operation goes
to rank 0's process, which is one of the members that may vanish, and a client of a store
whose host stopped answering waits in the store's own retries rather than failing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

from spotrun import contract
from spotrun.membership.beats import Beats, datagram, remove_beats, write_beats

log = logging.getLogger("spotrun")

_ADDRESS_KEY = "spotrun/peer/{rank}"
_TOKEN_KEY = "spotrun/peer/token"
# Heartbeats per timeout: a member is reported after missing this many in a row.
_BEATS_PER_TIMEOUT = 5
_LONGEST_INTERVAL = 1.0
_BYE = "bye"
# How long the watch waits for every member's address: members start their sessions within
# seconds of each other (the start-up agreement is a collective), but rank 0 may first write
# the status.
EXCHANGE_SECONDS = 60.0


class Silence:
    """Which nodes stayed silent for longer than `timeout` (monotonic seconds; pure).

    A node is silent when none of its workers (`node_of` maps a peer's rank to its node) was
    heard from: one worker of a node held up alone (a long call that keeps the interpreter
    lock) says nothing of the node.
    """

    def __init__(
        self,
        peers: Iterable[int],
        timeout: float,
        now: float,
        node_of: Callable[[int], int] = lambda rank: rank,
    ) -> None:
        self.timeout = timeout
        self.node_of = node_of
        self.heard = dict.fromkeys(peers, now)

    def heard_from(self, peer: int, now: float) -> None:
        if peer in self.heard:
            self.heard[peer] = max(self.heard[peer], now)

    def forget(self, peer: int) -> None:
        """`peer` left on purpose: its silence says nothing any more."""
        self.heard.pop(peer, None)

    def reset(self, now: float) -> None:
        """The watcher itself was not listening until `now`: it judges nobody by that time."""
        self.heard = dict.fromkeys(self.heard, now)

    def silent(self, now: float) -> tuple[int, ...]:
        latest: dict[int, float] = {}
        for peer, heard in self.heard.items():
            node = self.node_of(peer)
            latest[node] = max(latest.get(node, heard), heard)
        return tuple(sorted(n for n, t in latest.items() if now - t > self.timeout))


def peer_timeout(env: Mapping[str, str] | None = None) -> float:
    """SPOTRUN_PEER_TIMEOUT_SECONDS (trainer.env), else the default; 0 turns the watch off."""
    env = os.environ if env is None else env
    raw = env.get(contract.PEER_TIMEOUT, "")
    if not raw:
        return contract.DEFAULT_PEER_TIMEOUT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(
            f"{contract.PEER_TIMEOUT}={raw!r}: expected a number of seconds (0 turns the peer "
            "watch off)"
        ) from None
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{contract.PEER_TIMEOUT}={raw!r}: expected a finite number >= 0")
    return seconds


def _interval(timeout: float) -> float:
    return min(_LONGEST_INTERVAL, timeout / _BEATS_PER_TIMEOUT)


class PeerWatch:
    """Heartbeats to and from the workers of the other nodes, on a daemon thread.

    `on_lost(nodes)` is called once, from the watch's thread, with the node ranks none of
    whose workers were heard from for `timeout` seconds; the watch then ends. Silence is
    judged once per heartbeat, after every datagram already queued was read, and not at all
    for a time this thread itself did not run. With
    `exchange`, the thread first learns the token and the peers' addresses from it (the
    group's store), so the session's start never waits for the slowest member.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        rank: int,
        node_of: Callable[[int], int],
        timeout: float,
        on_lost: Callable[[tuple[int, ...]], None],
        token: str = "",
        peers: Mapping[int, tuple[str, int]] | None = None,
        exchange: Callable[[], tuple[str, dict[int, tuple[str, int]]]] | None = None,
        beats_for: tuple[str, int] | None = None,
    ) -> None:
        self.sock = sock
        self.rank = rank
        self.token = token
        self.peers = dict(peers or {})
        self.node_of = node_of
        self.timeout = timeout
        self.interval = _interval(timeout)
        self.on_lost = on_lost
        self._exchange = exchange
        # (group file, local rank): where this worker's launcher picks up its heartbeat, to
        # send it while this thread cannot (spotrun.membership.beats).
        self._beats_for = beats_for
        self._stop = threading.Event()
        self._stopped = False
        self._reported = False
        # Held while on_lost runs: stop() returns only after a report in flight is done.
        self._reporting = threading.Lock()
        # Set once the addresses are known and the thread heartbeats (it reads the socket).
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spotrun-peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Says goodbye to the peers and ends the watch, a report in flight included (idempotent).

        The caller may leave its group once this returns: a report's abort of the group's
        connections is over by then, and no later one can start.
        """
        with self._reporting:
            if self._stopped:
                return
            self._stopped = True
            self._stop.set()
            if self._beats_for is not None:
                remove_beats(*self._beats_for)
        if not self._reported and self.token:
            self._send(f"{self.token} {self.rank} {_BYE}".encode())
        if self._listening.is_set() and self._thread is not threading.current_thread():
            # The thread waits for a datagram for up to an interval (a second by default);
            # a survivor stops its watch on the way to the next group, so wake it instead of
            # waiting (a regroup paid 0.4-0.8 s here). The wake-up is an empty datagram to
            # its own socket: a shutdown() does not end a blocked recv on every kernel.
            with contextlib.suppress(OSError):
                self.sock.sendto(b"", self.sock.getsockname())
            self._thread.join(timeout=self.interval + 0.5)
        # A thread still exchanging the addresses is not waited for: it waits on the group's
        # store, and once it returns it sees the stop and touches nothing.
        self.sock.close()

    def _send(self, message: bytes) -> None:
        for address in list(self.peers.values()):
            with contextlib.suppress(OSError):  # unreachable: its silence will tell
                self.sock.sendto(message, address)

    def _run(self) -> None:
        if self._exchange is not None:
            try:
                self.token, self.peers = self._exchange()
            except Exception as err:  # RuntimeError from the store, ValueError from its values
                if not self._stop.is_set():
                    log.warning(
                        "rank %d: no peer watch (the addresses were not exchanged: %s)",
                        self.rank,
                        err,
                    )
                return
        self._hand_over()
        self._listening.set()
        beat = datagram(self.token, self.rank)
        silence = Silence(self.peers, self.timeout, time.monotonic(), self.node_of)
        ticked = time.monotonic()
        while not self._stop.is_set():
            self._send(beat)
            if not self._listen(silence, until=time.monotonic() + self.interval):
                return  # closed by stop()
            now = time.monotonic()
            if now - ticked > self.interval + self.timeout / 2:
                # This thread did not run for a while (its process was stopped, or kept from
                # the CPU or the interpreter lock): what it did not hear meanwhile says
                # nothing of its peers.
                silence.reset(now)
            ticked = now
            lost = silence.silent(now)
            if lost:
                self._report(lost)
                return

    def _hand_over(self) -> None:
        """Leaves this worker's heartbeat for its launcher to send as well."""
        if self._beats_for is None:
            return
        beats = Beats(self.token, self.rank, os.getpid(), self.interval, tuple(self.peers.values()))
        with self._reporting:
            if self._stopped:
                return
            try:
                write_beats(*self._beats_for, beats)
            except OSError as err:
                log.warning("rank %d: the launcher cannot send heartbeats too: %s", self.rank, err)

    def _listen(self, silence: Silence, until: float) -> bool:
        """Takes in the datagrams that come until `until`, then those already queued (a
        bounded number: a flood must not keep the watch from judging); False once the socket
        is closed."""
        backlog = 4 * len(self.peers) + 64
        while True:
            left = until - time.monotonic()
            try:
                self.sock.settimeout(max(0.0, left))  # 0: only what is queued
                data = self.sock.recv(256)
            except (TimeoutError, BlockingIOError):
                if left <= 0:
                    return True
                continue
            except OSError:
                return False
            if self._stop.is_set():
                return False  # stop() woke this thread
            heard = self._parse(data)
            if heard is not None:
                peer, bye = heard
                if bye:
                    silence.forget(peer)
                else:
                    silence.heard_from(peer, time.monotonic())
            if left <= 0:
                backlog -= 1
                if backlog <= 0:
                    return True

    def _report(self, nodes: tuple[int, ...]) -> None:
        with self._reporting:
            if self._stopped:
                return
            self._reported = True
            self._stop.set()
            log.warning(
                "rank %d: no heartbeat from any worker of node(s) %s for %gs: reporting them lost",
                self.rank,
                ", ".join(map(str, nodes)),
                self.timeout,
            )
            self.on_lost(nodes)

    def _parse(self, data: bytes) -> tuple[int, bool] | None:
        parts = data.split()
        if len(parts) not in (2, 3) or parts[0] != self.token.encode():
            return None
        if not parts[1].isdigit():
            return None
        peer = int(parts[1])
        if peer not in self.peers:
            return None
        return peer, len(parts) == 3 and parts[2] == _BYE.encode()


def start_watch(
    store: Any,
    *,
    rank: int,
    world: int,
    nproc_per_node: int,
    timeout: float,
    on_lost: Callable[[tuple[int, ...]], None],
    exchange_seconds: float = EXCHANGE_SECONDS,
    beats_for: tuple[str, int] | None = None,
) -> PeerWatch | None:
    """Starts the watch of this worker over the workers of the other nodes, or returns None.

    `store` is the group's store; every member calls this once its session started. The
    addresses are exchanged on the watch's thread, for up to `exchange_seconds` (a member
    that never publishes its address leaves the group unwatched, logged). None when there
    is nothing to watch (one node), or the watch is off (timeout 0). With `beats_for`
    (the group file and this worker's local rank), its launcher sends its heartbeat too.
    """
    node = rank // nproc_per_node
    others = [r for r in range(world) if r // nproc_per_node != node]
    if timeout <= 0 or not others:
        return None
    try:
        sock, address = _bind(
            os.environ[contract.MASTER_ADDR], int(os.environ[contract.MASTER_PORT])
        )
    except (KeyError, ValueError, OSError) as err:
        log.warning("rank %d: no peer watch (cannot open a UDP socket: %s)", rank, err)
        return None

    def exchange() -> tuple[str, dict[int, tuple[str, int]]]:
        if rank == 0:
            store.set(_TOKEN_KEY, secrets.token_hex(16))
        store.set(_ADDRESS_KEY.format(rank=rank), f"{address[0]} {address[1]}")
        keys = [_TOKEN_KEY, *(_ADDRESS_KEY.format(rank=r) for r in others)]
        store.wait(keys, timedelta(seconds=exchange_seconds))
        token, *addresses = (value.decode() for value in store.multi_get(keys))
        return token, {r: _address(text) for r, text in zip(others, addresses, strict=True)}

    return PeerWatch(
        sock,
        rank=rank,
        node_of=lambda r: r // nproc_per_node,
        timeout=timeout,
        on_lost=on_lost,
        exchange=exchange,
        beats_for=beats_for,
    ).start()


def _bind(master_addr: str, master_port: int) -> tuple[socket.socket, tuple[str, int]]:
    """A UDP socket on the address this host reaches rank 0 from, and that address."""
    family, _, _, _, target = socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_DGRAM)[
        0
    ]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(target)  # a UDP connect sends nothing: it only picks the route
        host = probe.getsockname()[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock, (host, sock.getsockname()[1])


def _address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(" ", 1)
    return host, int(port)
