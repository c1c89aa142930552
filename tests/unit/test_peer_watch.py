"""The peer watch (spotrun.train.liveness): silence, heartbeats over real UDP sockets on
127.0.0.1, the address exchange through a real TCPStore, and the launcher's report files."""

from __future__ import annotations

import ctypes
import functools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from torch.distributed import TCPStore  # type: ignore[attr-defined]

from spotrun import contract
from spotrun.ledger.sink import FileStatusSink, read_status_file, status_file
from spotrun.membership import beats as beats_module
from spotrun.membership.beats import Beats, read_beats, remove_beats, write_beats
from spotrun.membership.groupfile import LostReport, read_lost_reports, write_lost_report
from spotrun.train import liveness
from spotrun.train.liveness import PeerWatch, Silence, peer_timeout, start_watch

pytestmark = pytest.mark.unit


def test_silence_names_the_peers_not_heard_from_within_the_timeout() -> None:
    silence = Silence([1, 2, 3], timeout=5.0, now=100.0)
    silence.heard_from(1, 104.0)
    silence.heard_from(9, 104.0)  # not a peer: ignored
    assert silence.silent(105.0) == ()
    assert silence.silent(105.5) == (2, 3)
    silence.forget(3)  # said goodbye
    assert silence.silent(200.0) == (1, 2)
    silence.heard_from(2, 90.0)  # a late, older datagram does not move the clock back
    assert silence.heard[2] == 100.0


def test_a_node_is_silent_only_when_none_of_its_workers_was_heard_from() -> None:
    silence = Silence([2, 3, 4, 5], timeout=5.0, now=100.0, node_of=lambda r: r // 2)
    silence.heard_from(3, 104.0)  # node 1: rank 2 held up, rank 3 answers
    assert silence.silent(106.0) == (2,)  # node 2 (ranks 4, 5): nobody answered
    assert silence.silent(109.5) == (1, 2)
    silence.forget(3)  # said goodbye: rank 2 alone speaks for node 1
    silence.heard_from(2, 109.0)
    assert silence.silent(110.0) == (2,)


def test_a_watcher_that_was_not_listening_judges_nobody_for_that_time() -> None:
    silence = Silence([1, 2], timeout=5.0, now=100.0)
    silence.reset(120.0)
    assert silence.silent(124.0) == ()
    assert silence.silent(125.5) == (1, 2)


@pytest.mark.parametrize(("raw", "expected"), [("", 10.0), ("2.5", 2.5), ("0", 0.0)])
def test_the_timeout_comes_from_the_environment(raw: str, expected: float) -> None:
    assert peer_timeout({contract.PEER_TIMEOUT: raw}) == expected


@pytest.mark.parametrize("raw", ["soon", "-1", "inf", "nan"])
def test_a_bad_timeout_says_what_is_expected(raw: str) -> None:
    with pytest.raises(ValueError, match="SPOTRUN_PEER_TIMEOUT_SECONDS"):
        peer_timeout({contract.PEER_TIMEOUT: raw})


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


class Pair:
    """Two watches, ranks 0 and 1 on nodes 0 and 1, talking over 127.0.0.1."""

    def __init__(self, timeout: float = 0.5) -> None:
        self.socks = [_udp(), _udp()]
        self.lost: list[tuple[int, tuple[int, ...]]] = []
        self.reported = threading.Event()
        self.watches = [
            PeerWatch(
                self.socks[rank],
                rank=rank,
                token="t0k3n",
                peers={1 - rank: self.socks[1 - rank].getsockname()},
                node_of=lambda r: r,
                timeout=timeout,
                on_lost=functools.partial(self._on_lost, rank),
            )
            for rank in (0, 1)
        ]

    def _on_lost(self, rank: int, nodes: tuple[int, ...]) -> None:
        self.lost.append((rank, nodes))
        self.reported.set()


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair()
    yield made
    for watch in made.watches:
        watch.stop()


def test_members_that_answer_are_never_reported(pair: Pair) -> None:
    for watch in pair.watches:
        watch.start()
    time.sleep(1.5)  # three timeouts
    assert pair.lost == []


def test_a_member_that_stops_answering_is_reported_once_by_its_peer(pair: Pair) -> None:
    pair.watches[0].start()  # rank 1 never sends: a node gone silent
    assert pair.reported.wait(5)
    time.sleep(0.6)
    assert pair.lost == [(0, (1,))]


def test_a_member_that_says_goodbye_is_not_reported(pair: Pair) -> None:
    for watch in pair.watches:
        watch.start()
    time.sleep(0.3)
    pair.watches[1].stop()  # leaves on purpose (its session ended)
    time.sleep(1.5)
    assert pair.lost == []


def test_a_process_held_up_past_the_timeout_reports_nobody(pair: Pair) -> None:
    """Both watches' threads stop for 1.5 s (three timeouts): the interpreter lock is held
    by one C call, as user code may do. Neither heard anything meanwhile, and neither
    counts that as its peer's silence."""
    for watch in pair.watches:
        watch.start()
    time.sleep(0.3)
    ctypes.PyDLL(None).usleep(1_500_000)  # a PyDLL call keeps the interpreter lock
    time.sleep(1.5)
    assert pair.lost == []


def test_one_worker_of_a_node_held_up_does_not_make_its_node_silent() -> None:
    """Rank 0 watches node 1 (ranks 2 and 3): rank 3 never answers, rank 2 does, until it
    stops too."""
    socks = [_udp(), _udp(), _udp()]
    lost: list[tuple[int, ...]] = []
    watch = PeerWatch(
        socks[0],
        rank=0,
        token="t0k3n",
        peers={2: socks[1].getsockname(), 3: socks[2].getsockname()},
        node_of=lambda r: r // 2,
        timeout=0.5,
        on_lost=lost.append,
    ).start()
    try:
        deadline = time.monotonic() + 1.5  # three timeouts
        while time.monotonic() < deadline:
            socks[1].sendto(b"t0k3n 2", socks[0].getsockname())
            time.sleep(0.05)
        assert lost == []
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost == [(1,)]
    finally:
        watch.stop()
        for sock in socks[1:]:
            sock.close()


def test_stopping_wakes_the_watch_instead_of_waiting_out_its_interval(pair: Pair) -> None:
    """A survivor stops its watch on its way to the next group: stop() must not wait for the
    thread's wait for a datagram to run out (an hour here; a second by default)."""
    for watch in pair.watches:
        watch.interval = 3600.0
        watch.start()
    watch = pair.watches[0]
    assert watch._listening.wait(5)
    time.sleep(0.1)  # into its recv
    stopper = threading.Thread(target=watch.stop)
    stopper.start()
    stopper.join(30)
    assert not stopper.is_alive(), "stop() waited for the heartbeat interval"
    assert not watch._thread.is_alive()
    assert pair.lost == []


def test_datagrams_without_the_token_or_from_strangers_keep_no_one_alive(pair: Pair) -> None:
    pair.watches[0].start()
    forger = _udp()
    target = pair.socks[0].getsockname()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        # b"": what stop() wakes its own thread with; from anyone else it stops nothing.
        for junk in (b"wrong 1", b"t0k3n 7", b"t0k3n x", b"t0k3n", b"\xff" * 300, b""):
            forger.sendto(junk, target)
        time.sleep(0.05)
    forger.close()
    assert pair.reported.wait(5)
    assert pair.lost == [(0, (1,))]


def test_ranks_map_to_nodes_and_a_node_s_own_workers_are_not_watched() -> None:
    """Two workers per node: rank 1 watches ranks 2 and 3 (node 1), not rank 0 (its node)."""
    store = TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=10), wait_for_workers=False)
    host, port = "127.0.0.1", store.port
    lost: list[tuple[int, ...]] = []
    env = {contract.MASTER_ADDR: host, contract.MASTER_PORT: str(port)}
    # Ranks 2 and 3 publish addresses nobody listens on: node 1 is silent from the start.
    dead = [_udp(), _udp()]
    for rank, sock in zip((2, 3), dead, strict=True):
        store.set(f"spotrun/peer/{rank}", f"127.0.0.1 {sock.getsockname()[1]}")
    store.set("spotrun/peer/token", "abc")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        watch = start_watch(
            store, rank=1, world=4, nproc_per_node=2, timeout=0.5, on_lost=lost.append
        )
    assert watch is not None
    try:
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost == [(1,)]
        assert set(watch.peers) == {2, 3} and watch.token == "abc"
    finally:
        watch.stop()
        for sock in dead:
            sock.close()


def test_no_watch_on_one_node_or_when_turned_off() -> None:
    store: Any = None  # not touched: nothing to exchange
    assert start_watch(store, rank=0, world=2, nproc_per_node=2, timeout=1.0, on_lost=print) is None
    assert start_watch(store, rank=0, world=4, nproc_per_node=2, timeout=0.0, on_lost=print) is None


def test_addresses_that_never_come_leave_the_group_unwatched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exchange runs on the watch's thread: the session never waits for it."""
    store = TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=10), wait_for_workers=False)
    monkeypatch.setenv(contract.MASTER_ADDR, "127.0.0.1")
    monkeypatch.setenv(contract.MASTER_PORT, str(store.port))
    lost: list[tuple[int, ...]] = []
    started = time.monotonic()
    watch = start_watch(
        store,
        rank=0,
        world=2,
        nproc_per_node=1,
        timeout=0.3,
        on_lost=lost.append,
        exchange_seconds=0.5,
    )
    assert watch is not None and time.monotonic() - started < 0.5
    watch._thread.join(10)
    assert not watch._thread.is_alive() and lost == []  # gave up, reported nothing
    watch.stop()


def test_lost_reports_round_trip_and_junk_beside_them_is_skipped(tmp_path: Any) -> None:
    group_file = str(tmp_path / "group.json")
    write_lost_report(group_file, 0, LostReport(3, (2, 1, 2)))
    (tmp_path / "group.json.lost-1").write_text("not json")
    (tmp_path / "group.json.lost-2").write_text(json.dumps({"attempt": 3, "nodes": [-1]}))
    (tmp_path / "group.json.lost-3").write_text(json.dumps({"attempt": "3", "nodes": [1]}))
    (tmp_path / "group.json.lost-4").write_text(json.dumps({"attempt": 3, "nodes": [True]}))
    (tmp_path / "other.lost-0").write_text(json.dumps({"attempt": 3, "nodes": [1]}))
    assert read_lost_reports(group_file) == [LostReport(3, (1, 2))]
    assert read_lost_reports(str(tmp_path / "missing" / "group.json")) == []


def test_the_file_sink_keeps_every_reporter_s_entry(tmp_path: Any) -> None:
    root = str(tmp_path)
    FileStatusSink(root, attempt=2).peers_lost(0, [1], 1_700_000_000.0)
    FileStatusSink(root, attempt=2).peers_lost(2, [1, 1], 1_700_000_001.0)
    status = read_status_file(status_file(root))
    assert status["peerReports"] == {
        "0": {"attempt": 2, "nodes": [1], "time": "2023-11-14T22:13:20Z"},
        "2": {"attempt": 2, "nodes": [1], "time": "2023-11-14T22:13:21Z"},
    }


def test_the_interval_leaves_several_heartbeats_per_timeout() -> None:
    assert liveness._interval(10.0) == 1.0
    assert liveness._interval(0.5) == pytest.approx(0.1)


def test_a_heartbeat_file_round_trips_and_junk_is_refused(tmp_path: Any) -> None:
    group = str(tmp_path / "group.json")
    beats = Beats("t0k3n", 3, 1234, 0.5, (("127.0.0.1", 9), ("::1", 10)))
    write_beats(group, 1, beats)
    (tmp_path / "group.json.beats-0").write_bytes(b"{not json")
    for junk in (
        {"token": "t 1", "rank": 0, "pid": 1, "interval": 1, "peers": []},  # a space: two words
        {"token": "t", "rank": -1, "pid": 1, "interval": 1, "peers": []},
        {"token": "t", "rank": 0, "pid": 0, "interval": 1, "peers": []},
        {"token": "t", "rank": 0, "pid": 1, "interval": 0, "peers": []},
        {"token": "t", "rank": 0, "pid": 1, "interval": 1, "peers": [["h", 70000]]},
        {"token": "t", "rank": 0, "pid": 1, "interval": 1, "peers": [["h"]]},
    ):
        with pytest.raises(ValueError, match="not a heartbeat file"):
            Beats.from_bytes(json.dumps(junk).encode())
    assert read_beats(group) == [beats]
    remove_beats(group, 1)
    remove_beats(group, 1)  # gone already: nothing to do
    assert read_beats(group) == []


def test_a_process_is_running_until_it_exits_even_unreaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert beats_module.process_runs(child.pid)
        child.kill()
        deadline = time.monotonic() + 5
        while beats_module.process_runs(child.pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # a zombie until waited for: not running
        assert not beats_module.process_runs(child.pid)
    finally:
        child.wait()
    assert not beats_module.process_runs(child.pid)


def watch_rank_1(socks: list[socket.socket], **options: Any) -> PeerWatch:
    """Rank 0's watch (on socks[0]) of rank 1 (at socks[1]), one worker per node, started."""
    return PeerWatch(
        socks[0],
        rank=0,
        token="t0k3n",
        peers={1: socks[1].getsockname()},
        node_of=lambda r: r,
        **options,
    ).start()


def test_the_launcher_keeps_a_held_up_worker_s_node_alive(tmp_path: Any) -> None:
    """Rank 0 watches rank 1, whose own thread never beats (held up); its launcher sends the
    heartbeat rank 1 left in its file, until the file goes (its session ended) or its
    process is gone."""
    group = str(tmp_path / "group.json")
    socks = [_udp(), _udp()]
    lost: list[tuple[int, ...]] = []
    watch = watch_rank_1(socks, timeout=0.5, on_lost=lost.append)
    alive = {"yes": True}
    write_beats(group, 0, Beats("t0k3n", 1, 4242, 0.1, (socks[0].getsockname(),)))
    stop = threading.Event()
    sender = threading.Thread(
        target=beats_module.send_beats, args=(group, stop, lambda pid: alive["yes"])
    )
    sender.start()
    try:
        time.sleep(1.5)  # three timeouts
        assert lost == []
        alive["yes"] = False  # the worker's process is gone: the node falls silent
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost == [(1,)]
    finally:
        stop.set()
        sender.join()
        watch.stop()
        socks[1].close()


def test_a_worker_hands_its_heartbeat_over_and_takes_it_back_when_it_leaves(
    tmp_path: Any,
) -> None:
    group = str(tmp_path / "group.json")
    socks = [_udp(), _udp()]
    watch = watch_rank_1(socks, timeout=5.0, on_lost=print, beats_for=(group, 0))
    try:
        deadline = time.monotonic() + 5
        while not read_beats(group) and time.monotonic() < deadline:
            time.sleep(0.02)
        (handed,) = read_beats(group)
        assert (handed.token, handed.rank, handed.peers) == ("t0k3n", 0, (socks[1].getsockname(),))
    finally:
        watch.stop()
        socks[1].close()
    assert read_beats(group) == []
