"""Warm recovery in `spotrun run` on real processes: a lost replica costs a rendezvous.

The survivors' worker processes stay (same pids: torch stays imported), only the lost
replica is started again, and its state comes from a survivor's memory, not the bucket.
The result is the uninterrupted run's, bit for bit (issue #13).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from spotrun.local.trainjob import json_schema
from tests.runtime.test_local_mode import (
    CONFIG,
    EXAMPLE,
    assert_bitwise_equal,
    final_state,
    run,
    start,
    status_of,
    trainjob,
)

pytestmark = pytest.mark.timeout(900)

JOB_FOLDER = Path("default") / "linear-demo"


def worker_pids(storage: Path) -> dict[tuple[int, int], list[int]]:
    """(attempt the replica was started for, replica index) -> pids of the workers it started."""
    out: dict[tuple[int, int], list[int]] = {}
    for log in sorted((storage / JOB_FOLDER / "logs").glob("attempt-*/replica-*.log")):
        attempt = int(log.parent.name.split("-")[1])
        index = int(log.stem.split("-")[1])
        out[(attempt, index)] = [int(p) for p in re.findall(r"started, pid (\d+)", log.read_text())]
    return out


def replica_log(storage: Path, attempt: int, index: int) -> str:
    return (
        storage / JOB_FOLDER / "logs" / f"attempt-{attempt:03d}" / f"replica-{index}.log"
    ).read_text()


def script_trainer(folder: Path) -> dict[str, object]:
    """A `python train.py` trainer running the demo's training function."""
    script = folder / "train.py"
    script.write_text(
        "import spotrun\n"
        "from examples.train_linear import train_func_steps\n\n"
        "if __name__ == '__main__':\n"
        "    train_func_steps(dict(spotrun.get_context().config))\n"
    )
    return {"image": "spotrun-runtime:dev", "command": ["python", str(script)]}


def run_one_fault(
    job: Path, storage: Path, fault: str, *flags: str, after: str = "3s"
) -> dict[str, Any]:
    """`spotrun run` with one seeded fault `after` that much training; the status of its success."""
    code, out = run(
        "run", str(job), "--storage", str(storage), fault, after, "--max-injections", "1",
        "--seed", "2", *flags,
    )  # fmt: skip
    assert code == 0, out
    status = status_of(storage)
    assert status["state"] == "Succeeded", status
    return status


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("reference")
    code, out = run("run", str(trainjob(folder)), "--storage", str(folder / "runs"))
    assert code == 0, out
    return final_state(folder / "runs")


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("--kill-every", "InjectedKill"), ("--preempt-every", "InjectedPreemption")],
)
def test_a_lost_replica_is_replaced_and_the_survivor_keeps_its_process(
    tmp_path: Path, reference: dict[str, object], fault: str, reason: str
) -> None:
    storage = tmp_path / "runs"
    job = trainjob(tmp_path)
    status = run_one_fault(job, storage, fault)
    (entry,) = status["interruptions"]
    assert (entry["reason"], entry["recovery"]) == (reason, "warm"), entry
    assert status["group"]["mode"] == "warm" and status["attempt"] == 2
    (kept,) = status["group"]["kept"]
    lost = 1 - kept
    pids = worker_pids(storage)
    # The survivor started its worker once, in attempt 1, and trained attempt 2 with it.
    assert len(pids[(1, kept)]) == 1 and (2, kept) not in pids, pids
    assert "attempt 2: this replica is kept" in replica_log(storage, 1, kept)
    # Only the lost replica was started again, and got its state from the survivor's memory.
    assert (2, lost) in pids
    assert f"from rank {kept}'s memory" in replica_log(storage, 2, lost)
    restored = status["restoredFrom"]
    assert restored["tier"] == "memory"
    # The survivor said how far it got; the steps lost count from there (or from the
    # progress in the status, if that was newer).
    assert restored["reached"] >= restored["step"], restored
    assert entry["stepsLost"] == max(entry.get("step", 0), restored["reached"]) - restored["step"]
    if reason == "InjectedPreemption":
        # With a notice the group stops at a step it holds in memory: nothing is redone.
        assert entry["stepsLost"] == 0, entry
        # Rank 0 recorded the step the group stopped at, after its final checkpoint: the
        # restart went out without waiting for the reclaimed replica to be gone.
        honoured = status["noticeHonoured"]
        assert (honoured["attempt"], honoured["step"]) == (1, restored["step"]), honoured
        # The step resumed from memory is the final checkpoint's, numbered in the bucket.
        assert "seq" in restored, restored
    assert_bitwise_equal(final_state(storage), reference)


def children(pid: int) -> list[int]:
    """The child processes of `pid`, oldest first (pids from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid
            found.append((int(fields[19]), int(entry.name)))  # start time, pid
    return [child for _, child in sorted(found)]


def wait_for(predicate: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.1)


def test_a_survivor_waiting_for_a_stuck_upload_still_regroups(
    tmp_path: Path, reference: dict[str, object]
) -> None:
    """A save waits for the rank's previous upload; a lost member ends that wait.

    Both replicas' writers are paused (SIGSTOP) mid-job, so their next saves wait for an
    upload that cannot finish, as with a large state on slow storage. Meanwhile the memory
    tier goes on: the snapshots between checkpoints go into the buffer no upload reads.
    Then one replica is killed (no notice). The survivor leaves the wait once the next
    group is published, joins it in the same process with the newest of those snapshots,
    a step no checkpoint holds, and the job ends like the uninterrupted run.
    """
    storage = tmp_path / "runs"
    job = trainjob(tmp_path)
    process = start(
        "run", str(job), "--storage", str(storage), "--no-live",
        "--kill-every", "4s", "--max-injections", "1", "--seed", "2",
    )  # fmt: skip
    paused: list[int] = []
    status_file = storage / JOB_FOLDER / "status.json"
    try:
        wait_for(
            lambda: (
                status_file.exists()
                and (status_of(storage).get("lastMetrics") or {}).get("step", -1) >= 20
            ),
            "training past step 20",
        )
        for index in (0, 1):
            (worker,) = worker_pids(storage)[(1, index)]
            writer = next(
                c
                for c in children(worker)
                if "_writer_process" in Path(f"/proc/{c}/cmdline").read_text()
            )
            os.kill(writer, signal.SIGSTOP)
            paused.append(writer)
        out, _ = process.communicate(timeout=240)
    finally:
        for pid in paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, out
    status = status_of(storage)
    (entry,) = status["interruptions"]
    assert entry["recovery"] == "warm" and status["restoredFrom"]["tier"] == "memory", status
    # The survivor left the wait in its own process, and trained attempt 2 with it.
    (kept,) = status["group"]["kept"]
    assert (2, kept) not in worker_pids(storage)
    assert "waited for its last save" in replica_log(storage, 1, kept)
    # The state came from a snapshot kept only in memory: it has no checkpoint number.
    assert "seq" not in status["restoredFrom"], status["restoredFrom"]
    assert status["inMemory"]["attempt"] == 2, status["inMemory"]
    schema = json_schema()["properties"]["status"]
    assert not [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(status)]
    assert_bitwise_equal(final_state(storage), reference)


def test_cold_recovery_restarts_every_replica(tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    job = trainjob(tmp_path, recovery="Cold")
    code, out = run(
        "run", str(job), "--storage", str(storage), "--kill-every", "3s", "--max-injections", "1"
    )
    assert code == 0, out
    status = status_of(storage)
    (entry,) = status["interruptions"]
    assert entry["recovery"] == "cold" and status["group"] == {
        "attempt": 2,
        "mode": "cold",
        "replicas": 2,
        "kept": [],
        "masterPort": status["group"]["masterPort"],
        "mtbfSeconds": status["group"]["mtbfSeconds"],
    }
    # The injected faults' own interval wins over the job's observed MTBF.
    assert "assume an MTBF of 3s (SPOTRUN_MTBF_SECONDS)" in replica_log(storage, 2, 0)
    pids = worker_pids(storage)
    assert {(2, 0), (2, 1)} <= set(pids)
    assert status["restoredFrom"]["tier"] == "bucket"


def test_a_script_trainer_runs_again_in_the_surviving_process(
    tmp_path: Path, reference: dict[str, object]
) -> None:
    storage = tmp_path / "runs"
    job = trainjob(tmp_path, trainer=script_trainer(tmp_path))
    code, out = run(
        "run", str(job), "--storage", str(storage), "--kill-every", "3s", "--max-injections", "1"
    )
    assert code == 0, out
    status = status_of(storage)
    (kept,) = status["group"]["kept"]
    pids = worker_pids(storage)
    assert len(pids[(1, kept)]) == 1 and (2, kept) not in pids, pids
    assert "spotrun.train._script_worker" in replica_log(storage, 1, kept)
    assert status["restoredFrom"]["tier"] == "memory"
    assert_bitwise_equal(final_state(storage), reference)


# A spare starts once the group trains and is ready after its two imports of torch, which
# took 6-7 s on 2 cores beside the training group: the spare tests train 20 s and lose
# their replica after 12 s of it.
SPARE_CONFIG = {**CONFIG, "steps": 400}


@pytest.fixture(scope="module")
def spare_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("spare-reference")
    job = trainjob(folder, config=SPARE_CONFIG)
    code, out = run("run", str(job), "--storage", str(folder / "runs"))
    assert code == 0, out
    return final_state(folder / "runs")


def test_the_reference_run_is_not_interrupted(reference: dict[str, object]) -> None:
    assert reference["step"] == CONFIG["steps"] - 1


def spare_log(storage: Path, slot: int, started: int) -> Path:
    return storage / JOB_FOLDER / "logs" / "spares" / f"spare-{slot}-{started}.log"


@pytest.mark.parametrize("kind", ["function", "script"])
def test_a_warm_spare_takes_the_lost_replicas_place(
    tmp_path: Path, spare_reference: dict[str, object], kind: str
) -> None:
    storage = tmp_path / "runs"
    job = (
        trainjob(tmp_path, trainer=script_trainer(tmp_path), config=SPARE_CONFIG)
        if kind == "script"
        else trainjob(tmp_path, config=SPARE_CONFIG)
    )
    status = run_one_fault(job, storage, "--kill-every", "--spares", "1", after="12s")
    (kept,) = status["group"]["kept"]
    lost = 1 - kept
    assert status["group"]["promoted"] == [{"spare": 0, "nodeRank": lost}], status["group"]
    # What the local supervisor wrote is what the CRD declares (nothing a server would prune).
    schema = json_schema()["properties"]["status"]
    assert not [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(status)]
    pids = worker_pids(storage)
    # No replica process was started for attempt 2: the spare's workers, started before
    # the loss, trained as the lost replica.
    assert (2, lost) not in pids and (2, kept) not in pids, pids
    log = spare_log(storage, 0, 1).read_text()
    # The spare says when it is ready (imports done), then when it is promoted.
    assert log.index("ready, waiting to be promoted") < log.index(
        f"spare 0 promoted to node {lost}"
    )
    assert "from rank" in log and "memory" in log, log
    assert status["restoredFrom"]["tier"] == "memory"
    # A new spare took the promoted one's place (started after the loss, stopped at the end).
    assert "warm spare 0" in spare_log(storage, 0, 2).read_text()
    assert_bitwise_equal(final_state(storage), spare_reference)


def test_a_spare_that_keeps_failing_is_retried_after_a_growing_pause(tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    job = trainjob(
        tmp_path,
        trainer={
            "image": "spotrun-runtime:dev",
            "function": "tests.runtime.workloads.spare_fails:train_func_steps",
        },
        config={**CONFIG, "steps": 400},  # 20 s of training: long enough for a few retries
    )
    code, out = run("run", str(job), "--storage", str(storage), "--spares", "1", "--no-live")
    assert code == 0, out  # the group trained on: a spare's failure is not the job's
    assert "spare 0: launcher exited with code 1" in out, out
    assert "a new spare in 5s" in out and "a new spare in 10s" in out, out
    logs = sorted((storage / JOB_FOLDER / "logs" / "spares").glob("spare-0-*.log"))
    assert "spare_fails: this module refuses to load in a spare" in logs[0].read_text()
    # 5 s, 10 s, 20 s... between attempts: a handful in a run of this length, not one per pass.
    assert 2 <= len(logs) <= 6, [p.name for p in logs]


def test_spec_spares_puts_a_waiting_pod_in_the_lost_members_place(
    tmp_path: Path, reference: dict[str, object]
) -> None:
    """spec.spares, as on a cluster: the pool runs replicas + spares launchers by ordinal.

    Pod 2 starts outside the group and waits; after the kill, the policy names it in the
    lost member's place (status.group.members), its workers get the state from the
    survivor's memory, and the lost member's replacement waits as the next spare.
    """
    storage = tmp_path / "runs"
    status = run_one_fault(trainjob(tmp_path, spares=1), storage, "--kill-every")
    (entry,) = status["interruptions"]
    assert (entry["reason"], entry["recovery"]) == ("InjectedKill", "warm"), entry
    group = status["group"]
    (kept_member,) = [i for i in group["kept"] if i != 2]
    lost = 1 - kept_member
    # The spare (pod 2) took the lost member's node rank; the survivor kept its own.
    members = [kept_member, 2] if kept_member == 0 else [2, kept_member]
    assert group["members"] == members and sorted(group["kept"]) == [kept_member, 2], group
    assert status["size"] == "2/2"
    pids = worker_pids(storage)
    # Pod 2 started its workers once, in attempt 1, and trained attempt 2 with them.
    assert len(pids[(1, 2)]) == 1 and (2, 2) not in pids, pids
    log = replica_log(storage, 1, 2)
    assert "is not a member of attempt 1's group" in log and "joins the group again" in log, log
    assert "memory" in log, log
    assert status["restoredFrom"]["tier"] == "memory"
    # The lost member's replacement started for attempt 2, outside the group, as a spare.
    assert "is not a member of attempt 2's group" in replica_log(storage, 2, lost)
    assert_bitwise_equal(final_state(storage), reference)


@pytest.mark.parametrize(("seed", "victim"), [("2", 0), ("0", 1)])
def test_a_replica_gone_silent_is_reported_by_its_peer_and_replaced_warm(
    tmp_path: Path, reference: dict[str, object], seed: str, victim: int
) -> None:
    """SIGSTOP to every process of one replica: its connections stay open and nothing closes,
    as when a node is powered off. The supervisor does not flag it (it sees a live process);
    only the survivor's peer watch can tell, and its report is what restarts the group.
    Victim 0 hosts the group's store (rank 0), victim 1 does not."""
    trainer = yaml.safe_load(EXAMPLE.read_text())["spec"]["trainer"]
    trainer["env"] = [{"name": "SPOTRUN_PEER_TIMEOUT_SECONDS", "value": "2"}]
    storage = tmp_path / "runs"
    code, out = run(
        "run", str(trainjob(tmp_path, trainer=trainer)), "--storage", str(storage),
        "--freeze-every", "3s", "--max-injections", "1", "--seed", seed,
    )  # fmt: skip
    assert code == 0, out
    assert f"injected freeze into replica {victim} of attempt 1" in out, out
    status = status_of(storage)
    assert status["state"] == "Succeeded", status
    (entry,) = status["interruptions"]
    assert (entry["kind"], entry["reason"], entry["recovery"]) == (
        "preemption",
        "PeerUnresponsive",
        "warm",
    ), entry
    survivor = 1 - victim
    assert status["group"]["kept"] == [survivor], status["group"]
    report = status["peerReports"][str(survivor)]
    assert (report["attempt"], report["nodes"]) == (1, [victim]), report
    log = replica_log(storage, 1, survivor)
    assert f"any worker of node(s) {victim} for" in log and "reported them lost" in log, log
    # The survivor trained on in the process it started with; its state went to the
    # replacement from memory.
    pids = worker_pids(storage)
    assert len(pids[(1, survivor)]) == 1 and (2, survivor) not in pids, pids
    assert status["restoredFrom"]["tier"] == "memory", status["restoredFrom"]
    assert_bitwise_equal(final_state(storage), reference)


def test_a_worker_that_holds_the_interpreter_lock_past_the_peer_timeout_is_not_reported(
    tmp_path: Path,
) -> None:
    """Rank 0 keeps the interpreter lock for 6 s (three peer timeouts) in one C call: its
    own heartbeat thread stops, but its launcher sends the heartbeat it handed over, so
    rank 1, waiting in the all-reduce, reports nobody; and rank 0's watch, which did not
    run meanwhile, judges nobody for that time. The job ends without an interruption."""
    trainer = {
        "image": "spotrun-runtime:dev",
        "function": "tests.runtime.workloads.interpreter_lock:train_func",
        "env": [{"name": "SPOTRUN_PEER_TIMEOUT_SECONDS", "value": "2"}],
    }
    config = {"steps": 60, "hold_rank": 0, "hold_at_step": 30, "hold_seconds": 6}
    storage = tmp_path / "runs"
    code, out = run(
        "run", str(trainjob(tmp_path, trainer=trainer, config=config)),
        "--storage", str(storage),
    )  # fmt: skip
    assert code == 0, out
    status = status_of(storage)
    assert status["state"] == "Succeeded", status
    assert (status["attempt"], status["preemptions"], status["failures"]) == (1, 0, 0), status
    assert not status.get("interruptions") and not status.get("peerReports"), status
    held = replica_log(storage, 1, 0)
    assert "interpreter_lock: holding it for 6s" in held and "released" in held, held
    for index in (0, 1):
        assert "no heartbeat" not in replica_log(storage, 1, index)


def test_a_spare_that_runs_while_a_replacement_is_awaited_takes_its_place(
    tmp_path: Path, reference: dict[str, object]
) -> None:
    """spec.spares without spec.elastic, two kills 2 s of training apart, each victim's
    capacity away for 10 s. The first loss promotes the spare (pod 2). The second finds no
    spare waiting and no capacity: the survivor waits in the new attempt's rendezvous for a
    replacement that cannot start. When the first victim's pod runs again it takes that
    place (SparePromoted), and the survivor leaves the rendezvous it waited in for the new
    group's, instead of waiting there for the collective timeout (10 minutes)."""
    storage = tmp_path / "runs"
    code, out = run(
        "run", str(trainjob(tmp_path, spares=1)), "--storage", str(storage),
        "--kill-every", "2s", "--max-injections", "2", "--unavailable-for", "10s",
        "--seed", "1",
        timeout=300,
    )  # fmt: skip
    assert code == 0, out
    status = status_of(storage)
    assert status["state"] == "Succeeded" and status["preemptions"] == 2, out
    kinds = [(e["kind"], e["reason"]) for e in status["interruptions"]]
    assert kinds == [
        ("preemption", "InjectedKill"),
        ("preemption", "InjectedKill"),
        ("resize", "SparePromoted"),
    ], kinds
    assert all(e["recovery"] == "warm" for e in status["interruptions"][:2])
    assert status["size"] == "2/2"
    assert_bitwise_equal(final_state(storage), reference)
