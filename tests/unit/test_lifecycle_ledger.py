"""The interruption ledger: entries, steps lost, seconds to recover, the last ten kept."""

from __future__ import annotations

from spotrun.lifecycle import ledger
from spotrun.lifecycle.classify import Interruption
from spotrun.lifecycle.times import format_time, parse_time

OOM = Interruption("failure", "OOMKilled", "replica 1 exited with code 137 (OOMKilled)", (1,))
LOST = Interruption("preemption", "NodeShutdown", "lost replica 1 (NodeShutdown)", (1,))


def test_record_appends_an_entry_with_the_step_reached() -> None:
    entries = ledger.record([], OOM, attempt=3, now=100.0, step=420)
    assert entries == [
        {
            "time": format_time(100.0),
            "attempt": 3,
            "kind": "failure",
            "reason": "OOMKilled",
            "message": "replica 1 exited with code 137 (OOMKilled)",
            "step": 420,
        }
    ]


def test_ledger_keeps_the_last_ten() -> None:
    entries: list[dict[str, object]] = []
    for attempt in range(1, 16):
        entries = ledger.record(entries, LOST, attempt=attempt, now=float(attempt), step=None)
    assert len(entries) == ledger.LEDGER_SIZE
    assert [e["attempt"] for e in entries] == list(range(6, 16))


def test_steps_lost_are_counted_from_the_checkpoint_resumed() -> None:
    entries = ledger.record([], LOST, attempt=1, now=0.0, step=120)
    entries = ledger.mark_restarted(entries, 0, now=5.0, step=None, resume_step=100)
    assert entries[0]["stepsLost"] == 20
    assert entries[0]["restartTime"] == format_time(5.0)


def test_a_final_checkpoint_after_the_interruption_loses_nothing() -> None:
    entries = ledger.record([], LOST, attempt=1, now=0.0, step=120)
    entries = ledger.mark_restarted(entries, 0, now=30.0, step=125, resume_step=125)
    assert entries[0]["stepsLost"] == 0


def test_steps_lost_unknown_without_progress_reports() -> None:
    entries = ledger.record([], LOST, attempt=1, now=0.0, step=None)
    entries = ledger.mark_restarted(entries, 0, now=5.0, step=None, resume_step=0)
    assert "stepsLost" not in entries[0]


def test_seconds_to_recover_run_from_the_interruption() -> None:
    entries = ledger.record([], LOST, attempt=1, now=1000.25, step=None)
    entries = ledger.mark_recovered(entries, 0, now=1042.75)
    assert entries[0]["secondsToRecover"] == 42.5


def test_open_entry_is_the_unrecovered_one_of_the_attempt() -> None:
    entries = ledger.record([], LOST, attempt=1, now=0.0, step=None)
    entries = ledger.mark_recovered(entries, 0, now=1.0)
    entries = ledger.record(entries, OOM, attempt=2, now=2.0, step=None)
    assert ledger.open_entry(entries, 2) == 1
    assert ledger.open_entry(entries, 1) is None


def test_reclassify_turns_a_failure_into_a_preemption() -> None:
    entries = ledger.record([], OOM, attempt=1, now=0.0, step=None)
    entries = ledger.reclassify(entries, 0, LOST)
    assert (entries[0]["kind"], entries[0]["reason"]) == ("preemption", "NodeShutdown")


def test_failure_times_include_hangs_not_preemptions() -> None:
    hang = Interruption("hang", "ProgressDeadlineExceeded", "", ())
    entries = ledger.record([], OOM, attempt=1, now=10.0, step=None)
    entries = ledger.record(entries, LOST, attempt=2, now=20.0, step=None)
    entries = ledger.record(entries, hang, attempt=3, now=30.0, step=None)
    assert ledger.failure_times(entries) == [10.0, 30.0]


def test_entries_are_copies() -> None:
    original = ledger.record([], OOM, attempt=1, now=0.0, step=None)
    ledger.mark_recovered(original, 0, now=1.0)
    assert "secondsToRecover" not in original[0]


def test_times_round_trip_with_milliseconds() -> None:
    for t in (0.0, 1_700_000_000.0, 1_700_000_000.125):
        assert parse_time(format_time(t)) == t
    assert format_time(1_700_000_000.0) == "2023-11-14T22:13:20Z"
    assert format_time(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"
    assert parse_time("2023-11-14T23:13:20+01:00") == 1_700_000_000.0


def test_the_observed_mtbf_is_the_time_since_the_start_over_the_interruptions() -> None:
    started = {"startTime": format_time(1000.0)}
    # Nothing known before the first interruption: the cadences keep their prior.
    assert ledger.observed_mtbf({**started, "preemptions": 0, "failures": 0}, 5000.0) is None
    assert ledger.observed_mtbf({**started, "preemptions": 3, "failures": 1}, 1100.0) == 25.0
    # Two interruptions within the first second make no sub-second MTBF.
    assert ledger.observed_mtbf({**started, "preemptions": 2}, 1000.4) == 1.0
    # A status without a start (or mangled by hand) gives no estimate rather than an error.
    assert ledger.observed_mtbf({"preemptions": 2}, 1100.0) is None
    assert ledger.observed_mtbf({**started, "preemptions": "many"}, 1100.0) is None
    assert ledger.observed_mtbf({"startTime": "yesterday", "failures": 1}, 1100.0) is None
