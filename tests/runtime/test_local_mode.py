"""`spotrun run` on real processes: the example survives faults, budgets hold, bad files fail.

Every run goes through the real CLI (`spotrun run FILE`), from the repository root as a
person would run it, on a copy of examples/trainjob.yaml shortened for a 2-core machine.
Each run is bounded by a timeout; the supervisor is killed if it overruns, and its
launchers (and their workers) die with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from spotrun.ledger.sink import read_status_file
from spotrun.train.checkpoint import Checkpoint
from tests.runtime.helpers import ROOT, SPOTRUN, wait_for

pytestmark = pytest.mark.timeout(600)

EXAMPLE = ROOT / "examples" / "trainjob.yaml"
# Short enough for CI, long enough that every fault lands mid-training.
CONFIG = {"steps": 120, "step_seconds": 0.05, "checkpoint_every": 10, "seed": 0}


def trainjob(tmp_path: Path, name: str = "job.yaml", **changes: Any) -> Path:
    """examples/trainjob.yaml with a shorter config and `changes` merged into its spec."""
    manifest = yaml.safe_load(EXAMPLE.read_text())
    spec = manifest["spec"]
    spec["config"] = dict(CONFIG)
    spec["failurePolicy"]["backoff"] = {"initialSeconds": 0.5, "maxSeconds": 1}
    for key, value in changes.items():
        spec[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(manifest))
    return path


def run(*args: str, timeout: float = 240) -> tuple[int, str]:
    """`spotrun run ...` from the repository root; returns (exit code, output)."""
    process = start(*args)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(
            f"spotrun {' '.join(args)} did not finish in {timeout}s:\n{out}"
        ) from None
    return process.returncode, out


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SPOTRUN, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def status_of(storage: Path, job: str = "linear-demo") -> dict[str, Any]:
    return read_status_file(str(storage / "default" / job / "status.json"))


def final_state(storage: Path) -> dict[str, Any]:
    """The latest checkpoint of the job, loaded through spotrun's verified loader."""
    uri = str(status_of(storage)["latestCheckpoint"]["uri"])
    return Checkpoint.from_uri(uri).to_dict()


def assert_bitwise_equal(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_the_example_survives_preemptions_and_kills_with_the_weights_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    job = trainjob(tmp_path)
    code, out = run("run", str(job), "--storage", str(tmp_path / "reference"))
    assert code == 0, out
    reference = final_state(tmp_path / "reference")
    assert status_of(tmp_path / "reference")["preemptions"] == 0

    storage = tmp_path / "faults"
    code, out = run(
        "run",
        str(job),
        "--storage",
        str(storage),
        "--preempt-every",
        "2s",
        "--kill-every",
        "2s",
        "--max-injections",
        "3",
        "--seed",
        "1",
    )
    assert code == 0, out
    status = status_of(storage)
    assert status["state"] == "Succeeded"
    # Fault clocks count training time, the kill's staggered by half its interval: preempt
    # at 2 s, kill at 3 s, preempt at 4 s; each one restarts the group, and none spends the
    # failure budget.
    reasons = [e["reason"] for e in status["interruptions"]]
    assert reasons == ["InjectedPreemption", "InjectedKill", "InjectedPreemption"], out
    assert (status["preemptions"], status["failures"], status["attempt"]) == (3, 0, 4)
    # A preemption with notice commits a final checkpoint: no step is redone.
    assert status["interruptions"][0]["stepsLost"] == 0, status["interruptions"]
    assert status["latestCheckpoint"]["step"] == CONFIG["steps"] - 1
    assert len(status["checkpoints"]) == 3  # numToKeep

    state = final_state(storage)
    assert state["step"] == CONFIG["steps"] - 1
    assert_bitwise_equal(state, reference)

    assert "Succeeded after" in out and "InjectedKill" in out and "work lost" in out
    code, table = run("status", str(storage / "default" / "linear-demo"), timeout=60)
    assert code == 0, table
    header, line = table.splitlines()
    assert header.split() == [
        "NAME",
        "STATE",
        "READY",
        "SIZE",
        "PREEMPTIONS",
        "FAILURES",
        "CHECKPOINT-STEP",
        "CHECKPOINT-AGE",
        "AGE",
    ]
    assert line.split()[:7] == ["linear-demo", "Succeeded", "0", "2/2", "3", "0", "119"]


def test_application_failures_fail_the_job_after_max_failures_and_preemptions_do_not_count(
    tmp_path: Path,
) -> None:
    manifest_policy = {
        "maxFailures": 1,
        "backoff": {"initialSeconds": 0.5, "maxSeconds": 1},
    }
    job = trainjob(tmp_path, failurePolicy=manifest_policy)
    storage = tmp_path / "runs"
    code, out = run(
        "run",
        str(job),
        "--storage",
        str(storage),
        "--fail-rank",
        "1",
        "--fail-after",
        "40",
        "--preempt-every",
        "1s",
        "--max-injections",
        "1",
    )
    assert code == 1, out
    status = status_of(storage)
    assert status["state"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "MaxFailuresExceeded"
    assert "more than failurePolicy.maxFailures=1" in failed["message"]
    # Attempt 1 is preempted before rank 1's bug strikes; attempts 2 and 3 hit the bug.
    assert (status["preemptions"], status["failures"]) == (1, 2), status["interruptions"]
    assert [e["kind"] for e in status["interruptions"]] == ["preemption", "failure", "failure"]
    assert "Failed: MaxFailuresExceeded" in out
    # The failed rank's own traceback is shown, not only the collateral crash.
    assert "InjectedFailure: injected by `spotrun run --fail-rank 1`" in out


def test_after_an_interruption_the_next_attempt_checkpoints_for_the_observed_mtbf(
    tmp_path: Path,
) -> None:
    """No MTBF given: the second attempt's cadences assume the job's own, from its ledger."""
    job = trainjob(tmp_path, failurePolicy={"maxFailures": 1, "backoff": {"initialSeconds": 0.5}})
    storage = tmp_path / "runs"
    code, out = run(
        "run", str(job), "--storage", str(storage), "--fail-rank", "1", "--fail-after", "20"
    )
    assert code == 1, out  # the injected bug strikes every attempt
    status = status_of(storage)
    assert status["attempt"] == 2 and status["failures"] == 2, status["interruptions"]
    mtbf = status["group"]["mtbfSeconds"]
    assert 0 < mtbf < 3600, status["group"]
    logs = storage / "default" / "linear-demo" / "logs"
    first = (logs / "attempt-001" / "replica-0.log").read_text()
    second = (logs / "attempt-002" / "replica-0.log").read_text()
    assert "assume an MTBF of 3600s (the default: no interruption yet)" in first
    assert f"assume an MTBF of {mtbf:g}s (observed: status.group.mtbfSeconds)" in second


def test_a_script_that_crashes_at_once_trips_the_circuit_breaker(tmp_path: Path) -> None:
    job = trainjob(
        tmp_path,
        trainer={
            "image": "spotrun-runtime:dev",
            "command": ["python", "tests/runtime/workloads/crash_at_once.py"],
        },
        failurePolicy={
            "maxFailures": 10,
            "circuitBreaker": {"failures": 3, "windowSeconds": 120},
            "backoff": {"initialSeconds": 0.2, "maxSeconds": 0.5},
        },
    )
    storage = tmp_path / "runs"
    code, out = run("run", str(job), "--storage", str(storage), timeout=120)
    assert code == 1, out
    status = status_of(storage)
    assert status["state"] == "Failed"
    assert status["failures"] == 3
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "CircuitBreakerTripped"
    assert "circuit breaker" in failed["message"].lower()
    assert "CircuitBreakerTripped" in out
    assert "crash_at_once: the training script fails before its first step" in out


def test_a_function_exiting_75_without_a_notice_spends_the_failure_budget(tmp_path: Path) -> None:
    job = trainjob(
        tmp_path,
        trainer={
            "image": "spotrun-runtime:dev",
            "function": "tests.runtime.workloads.exit_75:train_func",
        },
        failurePolicy={
            "maxFailures": 1,
            "maxPreemptions": 3,
            "backoff": {"initialSeconds": 0.2, "maxSeconds": 0.5},
        },
    )
    storage = tmp_path / "runs"
    code, out = run("run", str(job), "--storage", str(storage), timeout=180)
    assert code == 1, out
    status = status_of(storage)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "MaxFailuresExceeded", failed
    assert (status["preemptions"], status["failures"]) == (0, 2), status["interruptions"]
    assert "exited with code 75 without a preemption notice" in out


def silent_job(tmp_path: Path, config: dict[str, Any], **policy: Any) -> Path:
    """One worker running tests/runtime/workloads/slow_start.py, no failure budget."""
    return trainjob(
        tmp_path,
        replicas=1,
        trainer={
            "image": "spotrun-runtime:dev",
            "function": "tests.runtime.workloads.slow_start:train_func",
        },
        config={"steps": 40, "step_seconds": 0.05, **config},
        failurePolicy={"maxFailures": 0, "backoff": {"initialSeconds": 0.2}, **policy},
    )


def test_a_start_up_slower_than_the_progress_deadline_is_not_a_hang(tmp_path: Path) -> None:
    # Asleep 20 s before its first report (imports come on top), with a 10 s progress
    # deadline; the deadline also covers the silent shutdown after the last step.
    job = silent_job(tmp_path, {"startup_seconds": 20}, progressDeadlineSeconds=10)
    storage = tmp_path / "runs"
    code, out = run("run", str(job), "--storage", str(storage), timeout=180)
    assert code == 0, out
    status = status_of(storage)
    assert (status["state"], status["failures"], status["attempt"]) == ("Succeeded", 0, 1), out
    assert status["lastMetrics"]["step"] >= 0  # it trained: reports came after the start-up


def test_a_group_that_stops_reporting_after_it_started_is_hung(tmp_path: Path) -> None:
    job = silent_job(tmp_path, {"steps": 10_000, "hang_at_step": 20}, progressDeadlineSeconds=5)
    storage = tmp_path / "runs"
    code, out = run("run", str(job), "--storage", str(storage), timeout=180)
    assert code == 1, out
    status = status_of(storage)
    assert status["state"] == "Failed"
    (hang,) = status["interruptions"]
    assert (hang["kind"], hang["reason"]) == ("hang", "ProgressDeadlineExceeded"), hang
    assert "progressDeadlineSeconds=5" in hang["message"]


def test_a_start_up_that_never_reports_is_hung_after_its_allowance(tmp_path: Path) -> None:
    job = silent_job(
        tmp_path, {"startup_seconds": 3600}, progressDeadlineSeconds=4, startupDeadlineSeconds=8
    )
    storage = tmp_path / "runs"
    code, out = run("run", str(job), "--storage", str(storage), timeout=180)
    assert code == 1, out
    status = status_of(storage)
    (hang,) = status["interruptions"]
    assert (hang["kind"], hang["reason"]) == ("hang", "StartupDeadlineExceeded"), hang
    assert "startupDeadlineSeconds=8" in hang["message"]


BAD_FILES = [
    (
        "malformed YAML",
        "apiVersion: spotrun.dev/v1alpha1\nkind: TrainJob\nmetadata:\n  name: x\nspec: [\n",
        "malformed YAML",
    ),
    (
        "schema violation",
        None,
        "spec.replicas: Invalid value: 0: should be greater than or equal to 1",
    ),
    (
        "CEL rule",
        None,
        "set exactly one of trainer.command",
    ),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_fail_with_the_crds_message(
    tmp_path: Path, name: str, text: str | None, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    else:
        manifest = yaml.safe_load(EXAMPLE.read_text())
        bad = copy.deepcopy(manifest)
        if name == "schema violation":
            bad["spec"]["replicas"] = 0
        else:
            bad["spec"]["trainer"]["command"] = ["python", "train.py"]
        path.write_text(yaml.safe_dump(bad))
    code, out = run("run", str(path), "--storage", str(tmp_path / "runs"), timeout=60)
    assert code == 2, out
    assert message in out
    assert str(path) in out  # the message names the file
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_job_far_beyond_the_machine_is_refused_before_anything_starts(tmp_path: Path) -> None:
    job = trainjob(tmp_path, replicas=10000, nprocPerNode=1024)
    code, out = run("run", str(job), "--storage", str(tmp_path / "runs"), timeout=60)
    assert code == 2, out
    assert "replicas x nprocPerNode = 10000 x 1024 = 10240000 workers" in out
    assert "CPU core(s)" in out and "lower spec.replicas or spec.nprocPerNode" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["flag", "spec"])
def test_memory_storage_is_refused_since_nothing_would_survive(tmp_path: Path, where: str) -> None:
    if where == "flag":
        job, args = trainjob(tmp_path), ["--storage", "memory://ckpt"]
    else:
        job, args = trainjob(tmp_path, checkpoint={"storage": "memory://ckpt", "numToKeep": 3}), []
    code, out = run("run", str(job), *args, timeout=60)
    assert code == 2, out
    assert "memory://ckpt is memory:// storage" in out and "no checkpoint" in out
    assert ("--storage" if where == "flag" else "spec.checkpoint.storage") in out


def test_a_garbled_status_is_a_one_line_error_for_run_and_status(tmp_path: Path) -> None:
    job = trainjob(tmp_path)
    folder = tmp_path / "runs" / "default" / "linear-demo"
    folder.mkdir(parents=True)
    (folder / "status.json").write_text('{"state": "Running", "attempt": ')
    for args in (["run", str(job), "--storage", str(tmp_path / "runs")], ["status", str(folder)]):
        code, out = run(*args, timeout=60)
        assert code == 2, out
        assert "Traceback" not in out, out
        (line,) = out.strip().splitlines()
        assert f"{folder / 'status.json'} is garbled (not JSON" in line, line
        assert "move the job folder aside" in line
    assert not (folder / "logs").exists()  # nothing started


def processes_of(storage: Path, *parts: str) -> list[int]:
    """Live processes of the run whose storage is `storage` with `parts` in their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state in ("Z", "X") or not all(part in cmdline for part in parts):
            continue
        if f"SPOTRUN_STORAGE={storage}".encode() in environ:
            found.append(int(entry.name))
    return found


WRITER = ("spotrun.train.", "writer")  # the writer process's command line


def test_checkpoint_writers_die_at_once_with_a_sigkilled_supervisor(tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    process = start("run", str(trainjob(tmp_path)), "--storage", str(storage), "--no-live")
    try:
        # The moment the first writer process exists: it has its imports (torch) ahead of it.
        wait_for(lambda: processes_of(storage, *WRITER), 120, "a checkpoint writer")
        writers = processes_of(storage, *WRITER)
        process.kill()
        process.communicate()
        # Its parent-death signal is armed before the imports, so it goes with its worker:
        # well within 2 s (an import of torch alone takes longer than that).
        wait_for(lambda: not processes_of(storage, "spotrun."), 2, "the run's processes to die")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        for pid in processes_of(storage, "spotrun."):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert writers


def test_ctrl_c_suspends_with_a_final_checkpoint_and_the_next_run_carries_on(
    tmp_path: Path,
) -> None:
    job = trainjob(tmp_path)
    storage = tmp_path / "runs"
    process = start("run", str(job), "--storage", str(storage))
    try:
        wait_for(
            lambda: (status_of(storage).get("lastMetrics") or {}).get("step", 0) >= 20,
            120,
            "training to pass step 20",
        )
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, out
    status = status_of(storage)
    assert status["state"] == "Suspended"
    suspended_at = status["latestCheckpoint"]["step"]
    # The workers heard the interrupt as a preemption notice: the step they stopped at was saved.
    assert suspended_at == status["lastMetrics"]["step"], status
    assert suspended_at < CONFIG["steps"] - 1

    code, out = run("run", str(job), "--storage", str(storage))
    assert code == 0, out
    assert "carrying on the unfinished run" in out
    status = status_of(storage)
    assert status["state"] == "Succeeded" and status["attempt"] == 2
    assert status["latestCheckpoint"]["step"] == CONFIG["steps"] - 1
