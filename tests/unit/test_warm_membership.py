"""Warm recovery's pure parts: who is kept, the group record and file, and what a peer may send."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from spotrun.contract import PodContract
from spotrun.lifecycle import JobSpec, Observation, ReplicaObservation, RestartGroup, plan
from spotrun.lifecycle.group import GroupRecord, rendezvous_port
from spotrun.membership.groupfile import GroupFile
from spotrun.pod import launcher
from spotrun.pod.launcher import _Membership
from spotrun.train.regroup import Holding, Slot, choose_source, is_group_failure

T0 = 1_700_000_000.0


def running(index: int, attempt: int = 1) -> ReplicaObservation:
    return ReplicaObservation(index, attempt, phase="running", ready=True)


def lost(index: int, attempt: int = 1, phase: str = "failed") -> ReplicaObservation:
    return ReplicaObservation(
        index,
        attempt,
        phase=phase,
        preempted=True,
        preemption_reason="NodeShutdown",  # type: ignore[arg-type]
    )


def crashed(index: int, attempt: int = 1) -> ReplicaObservation:
    return ReplicaObservation(index, attempt, phase="failed", exit_code=1, reason="Error")


def started(spec: JobSpec) -> dict[str, object]:
    status = plan(spec, {}, Observation(T0, ())).status
    group = tuple(running(i) for i in range(spec.replicas))
    return plan(spec, status, Observation(T0 + 1, group)).status


@pytest.mark.parametrize(
    ("recovery", "replicas", "keep"),
    [
        ("warm", (running(0), lost(1), running(2)), (0, 2)),
        ("warm", (lost(0), running(1), running(2)), (1, 2)),
        ("cold", (running(0), lost(1), running(2)), ()),
        # Nobody survived: every replica is new, as cold.
        ("warm", (lost(0), lost(1), lost(2)), ()),
    ],
)
def test_a_preemption_keeps_the_survivors_only_in_warm_recovery(
    recovery: str, replicas: tuple[ReplicaObservation, ...], keep: tuple[int, ...]
) -> None:
    spec = JobSpec(replicas=3, recovery=recovery)  # type: ignore[arg-type]
    decision = plan(spec, started(spec), Observation(T0 + 50, replicas))
    (action,) = decision.actions
    assert isinstance(action, RestartGroup) and action.keep == keep
    assert action.not_before == T0 + 50  # no backoff for a preemption
    record = GroupRecord.from_status(decision.status)
    # The one preemption came 50 s into the job: the next cadences assume that of the next.
    assert record == GroupRecord(2, "warm" if keep else "cold", 3, keep, mtbf_seconds=50.0)
    assert decision.status["interruptions"][-1]["recovery"] == ("warm" if keep else "cold")


@pytest.mark.parametrize("fraction", [0.0, 0.0004, 0.0006, 0.9996])
def test_a_preemption_restarts_in_the_pass_that_sees_it_whatever_the_clock_reads(
    fraction: float,
) -> None:
    """restartNotBefore is written to the millisecond, rounded: read back it may lie a
    fraction of a millisecond after the pass's clock, and the restart must not wait a pass
    (a poll locally, a debounce in the operator) for it."""
    spec = JobSpec(replicas=2)
    decision = plan(spec, started(spec), Observation(T0 + 50 + fraction, (running(0), lost(1))))
    restarts = [a for a in decision.actions if isinstance(a, RestartGroup)]
    assert [a.keep for a in restarts] == [(0,)], decision.actions


def test_a_failure_restarts_the_whole_group_after_its_backoff_even_in_warm_recovery() -> None:
    spec = JobSpec(replicas=2)
    status = plan(spec, started(spec), Observation(T0 + 50, (running(0), crashed(1)))).status
    assert status["state"] == "Restarting" and "restartNotBefore" in status
    decision = plan(spec, status, Observation(T0 + 5000, (running(0), crashed(1))))
    (action,) = decision.actions
    assert isinstance(action, RestartGroup) and action.keep == ()


def test_pods_of_a_newer_attempt_than_the_status_are_fenced_out_not_joined() -> None:
    # The status was rolled back to attempt 1 while pods of attempt 2 exist, one of them
    # preempted. The restart that follows the preemption (no backoff) must not take their
    # number: they would join an attempt they were never started for, and their
    # preemption would be counted again in the same pass (found by hypothesis in CI).
    spec = JobSpec(replicas=2)
    status = started(spec)
    decision = plan(spec, status, Observation(T0 + 50, (running(0, 2), lost(1, 2))))
    assert decision.status["attempt"] == 3
    assert decision.status["preemptions"] == 1 and decision.status["failures"] == 0
    (action,) = decision.actions
    assert isinstance(action, RestartGroup) and action.attempt == 3 and action.keep == ()
    assert plan(spec, decision.status, Observation(T0 + 50, (running(0, 2), lost(1, 2)))) == (
        decision
    )


def test_steps_lost_of_a_warm_recovery_come_from_where_the_state_was_restored() -> None:
    spec = JobSpec(replicas=2)
    status = started(spec)
    status["lastMetrics"] = {"step": 41, "time": "2023-11-14T22:13:30Z"}
    status = plan(spec, status, Observation(T0 + 50, (running(0), lost(1)))).status
    assert "stepsLost" not in status["interruptions"][-1]
    # Rank 0 of attempt 2 restored the survivor's snapshot of step 39.
    status["restoredFrom"] = {"tier": "memory", "step": 39, "seq": 3, "attempt": 2}
    status = plan(spec, status, Observation(T0 + 60, (running(0, 2), running(1, 2)))).status
    assert status["interruptions"][-1]["stepsLost"] == 2
    assert status["state"] == "Running"


@pytest.mark.parametrize(
    ("known", "reached", "steps_lost"), [(41, 45, 6), (41, 40, 2), (None, 45, 6)]
)
def test_steps_lost_count_from_what_a_survivor_reached_when_the_status_lagged(
    known: int | None, reached: int, steps_lost: int
) -> None:
    # Progress reaches the status at most once a second: a survivor that reported steps
    # 42-45 after the last progress write knows the group got further than the status.
    spec = JobSpec(replicas=2)
    status = started(spec)
    if known is not None:
        status["lastMetrics"] = {"step": known, "time": "2023-11-14T22:13:30Z"}
    status = plan(spec, status, Observation(T0 + 50, (running(0), lost(1)))).status
    status["restoredFrom"] = {"tier": "memory", "step": 39, "attempt": 2, "reached": reached}
    status = plan(spec, status, Observation(T0 + 60, (running(0, 2), running(1, 2)))).status
    assert status["interruptions"][-1]["stepsLost"] == steps_lost


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "warm",
        {"mode": "warm"},
        {"attempt": "x", "replicas": 2},
        {"attempt": 1, "replicas": 2, "kept": ["a"]},
        {"attempt": 1, "replicas": 2, "promoted": ["0"]},
        {"attempt": 1, "replicas": 2, "promoted": [{"spare": 0}]},
        {"attempt": 1, "replicas": 2, "promoted": [{"spare": 0, "nodeRank": 2}]},
        {"attempt": 1, "replicas": 2, "promoted": [{"spare": -1, "nodeRank": 0}]},
    ],
)
def test_a_bad_group_record_reads_as_none(raw: object) -> None:
    assert GroupRecord.from_status({"group": raw}) is None


def test_a_group_record_keeps_only_in_warm_mode() -> None:
    warm = GroupRecord(3, "warm", 4, (0, 2), master_port=40000)
    assert GroupRecord.from_status({"group": warm.to_status()}) == warm
    assert warm.keeps(2) and not warm.keeps(1)
    assert not GroupRecord(3, "cold", 4, (0, 2)).keeps(0)
    assert rendezvous_port(29500, 3) == 29503
    assert rendezvous_port(29500, 515) == 29503  # wraps around its span


def test_a_group_record_names_the_spares_it_promotes() -> None:
    record = GroupRecord(4, "warm", 3, (0, 2), master_port=40000, promoted=((1, 1),))
    raw = record.to_status()
    assert raw["promoted"] == [{"spare": 1, "nodeRank": 1}]
    assert GroupRecord.from_status({"group": raw}) == record
    assert record.promotes(1) == 1 and record.promotes(0) is None
    assert "promoted" not in GroupRecord(4, "warm", 3, (0, 2)).to_status()


def test_a_group_record_carries_the_observed_mtbf_and_ignores_a_bad_one() -> None:
    record = GroupRecord(4, "warm", 3, (0, 2), mtbf_seconds=12.5)
    raw = record.to_status()
    assert raw["mtbfSeconds"] == 12.5
    assert GroupRecord.from_status({"group": raw}) == record
    assert "mtbfSeconds" not in GroupRecord(4, "warm", 3, (0, 2)).to_status()
    # A bad estimate (status.json edited by hand) costs the estimate, not the membership.
    for bad in ("soon", -1, 0, True, float("nan"), [3]):
        assert GroupRecord.from_status({"group": {**raw, "mtbfSeconds": bad}}) == GroupRecord(
            4, "warm", 3, (0, 2)
        )


def test_a_kept_replicas_next_group_file_carries_the_observed_mtbf(tmp_path: Path) -> None:
    pod = PodContract(job="j", replicas=2, node_rank=1, storage=str(tmp_path))
    membership = _Membership(pod, 1, {})
    try:
        group = GroupRecord(2, "warm", 2, (1,), master_port=40002, mtbf_seconds=12.5)
        membership.on_status({"group": group.to_status()})
        written = GroupFile.from_bytes(Path(membership.path).read_bytes())
        assert (written.attempt, written.node_rank) == (2, 1)
        assert written.worker_env(0)["SPOTRUN_OBSERVED_MTBF_SECONDS"] == "12.5"
        # Before the first interruption there is none: the cadences keep their prior.
        membership.on_status({"group": GroupRecord(3, "warm", 2, (1,)).to_status()})
        written = GroupFile.from_bytes(Path(membership.path).read_bytes())
        assert written.attempt == 3
        assert "SPOTRUN_OBSERVED_MTBF_SECONDS" not in written.worker_env(0)
    finally:
        membership.stop()


@contextlib.contextmanager
def spare_pod(tmp_path: Path, node_rank: int, attempt: int) -> Iterator[_Membership]:
    """The membership of a pool pod outside its group (a spare of spec.spares), stopped after."""
    pod = PodContract(
        job="j", replicas=2, node_rank=node_rank, attempt=attempt, storage=str(tmp_path)
    )
    membership = _Membership(pod, 1, {})
    membership.joining = True
    try:
        yield membership
    finally:
        membership.stop()


def test_a_spare_pods_workers_may_start_once_its_attempt_reports_progress(
    tmp_path: Path,
) -> None:
    with spare_pod(tmp_path, 2, 1) as membership:
        group = GroupRecord(1, "warm", 2, (0, 1, 2)).to_status()
        membership.on_status({"attempt": 1, "group": group})
        membership.on_status({"attempt": 1, "group": group, "state": "Running"})
        assert not membership.may_start.is_set()  # the group's pods run, it trains not yet
        progress = {"step": 0, "time": "2026-12-07T00:00:00Z"}
        membership.on_status({"attempt": 1, "group": group, "lastMetrics": progress})
        assert membership.may_start.is_set()
        assert not Path(membership.path).exists()  # still a spare: no group names it


def test_a_spare_started_mid_attempt_waits_for_that_attempts_next_progress(
    tmp_path: Path,
) -> None:
    """A promoted spare's successor sees the attempt's progress so far; it waits for more."""
    with spare_pod(tmp_path, 1, 2) as membership:
        group = GroupRecord(2, "warm", 2, (0, 2), members=(0, 2)).to_status()
        seen = {"attempt": 2, "group": group, "lastMetrics": {"step": 40}}
        membership.on_status(seen)
        membership.on_status(dict(seen))
        assert not membership.may_start.is_set()
        membership.on_status({**seen, "lastMetrics": {"step": 47}})
        assert membership.may_start.is_set()


def test_a_spare_named_by_a_group_before_it_started_starts_at_once(tmp_path: Path) -> None:
    with spare_pod(tmp_path, 2, 1) as membership:
        first = GroupRecord(1, "warm", 2, (0, 1, 2)).to_status()
        membership.on_status({"attempt": 1, "group": first, "state": "Running"})
        assert not membership.may_start.is_set()
        # Member 1 lost before the group reported progress: spare 2 takes its place.
        promoted = GroupRecord(2, "warm", 2, (0, 2), members=(0, 2)).to_status()
        membership.on_status({"attempt": 2, "group": promoted, "state": "Restarting"})
        assert membership.may_start.is_set()
        written = GroupFile.from_bytes(Path(membership.path).read_bytes())
        assert (written.attempt, written.node_rank) == (2, 1)


def test_a_held_spare_stopped_by_sigterm_starts_nothing(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with spare_pod(tmp_path, 2, 1) as membership:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        try:
            assert launcher._hold_spare(membership) is False
        finally:
            timer.cancel()
        assert signal.getsignal(signal.SIGTERM) == before
        membership.may_start.set()
        assert launcher._hold_spare(membership) is True


def test_the_group_file_gives_each_worker_its_rank_in_the_next_group() -> None:
    group = GroupFile(
        attempt=5,
        master_addr="job-0.job.ns.svc",
        master_port=29505,
        replicas=3,
        nproc_per_node=2,
        node_rank=1,
    )
    again = GroupFile.from_bytes(group.to_bytes())
    assert again == group
    # A promoted spare learns its node rank here too (it was started as nobody's).
    env = group.worker_env(1)
    assert (env["RANK"], env["SPOTRUN_NODE_RANK"], env["GROUP_RANK"]) == ("3", "1", "1")
    env = again.worker_env(local_rank=1)
    assert (env["RANK"], env["WORLD_SIZE"], env["SPOTRUN_ATTEMPT"]) == ("3", "6", "5")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("job-0.job.ns.svc", "29505")


@pytest.mark.parametrize(
    ("holdings", "chosen"),
    [
        # The replacement (rank 1) lacks it; the lowest rank with the newest step sends it.
        ([Holding(40, 4, 4), Holding(-1, -1, -1), Holding(40, 4, 4)], (0, [1])),
        # A rank with an older snapshot is sent the newest too.
        ([Holding(30, 3, 4), Holding(40, 4, 4)], (1, [0])),
        ([Holding(-1, -1, 2), Holding(-1, -1, -1)], None),
    ],
)
def test_the_newest_snapshot_in_memory_is_served_by_the_lowest_rank_holding_it(
    holdings: list[Holding], chosen: tuple[int, list[int]] | None
) -> None:
    assert choose_source(holdings) == chosen


@pytest.mark.parametrize(
    "raw",
    [
        {"index": 0, "offset": 0, "dtype": "torch.float32", "shape": [4], "count": 4},
        {"index": 0, "offset": 48, "dtype": "torch.float32", "shape": [4], "count": 4},
    ],
)
def test_a_tensor_table_entry_inside_the_buffer_is_accepted(raw: dict[str, object]) -> None:
    slot = Slot.from_json(raw, size=64)
    assert (slot.dtype, slot.shape) == (torch.float32, (4,))


@pytest.mark.parametrize(
    "raw",
    [
        {"index": 0, "offset": 60, "dtype": "torch.float32", "shape": [4], "count": 4},  # past end
        {"index": 0, "offset": -4, "dtype": "torch.float32", "shape": [1], "count": 1},
        {"index": 0, "offset": 0, "dtype": "torch.float32", "shape": [2, 2], "count": 3},
        {"index": 0, "offset": 0, "dtype": "builtins.object", "shape": [1], "count": 1},
        {"index": 0, "offset": 0, "dtype": "torch.float32", "shape": [-1], "count": -1},
    ],
)
def test_a_peer_cannot_point_a_tensor_outside_the_buffer_it_sent(raw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Slot.from_json(raw, size=64)


@pytest.mark.parametrize(
    ("err", "lost_member"),
    [
        (
            RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [1.2.3.4]"),
            True,
        ),
        (RuntimeError("Connection reset by peer"), True),
        (RuntimeError("CUDA out of memory"), False),
        (ValueError("Connection closed by peer"), False),
        (KeyError("loss"), False),
    ],
)
def test_only_a_lost_peer_is_a_reason_to_regroup(err: BaseException, lost_member: bool) -> None:
    assert is_group_failure(err) == lost_member
