"""After success the launcher records completion in the status, and can hold the pod open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from spotrun import contract as pod
from spotrun.ledger.sink import read_status_file, update_status_file
from tests.fixtures.gcs import free_port
from tests.runtime.helpers import SPOTRUN, wait_for


def launcher(tmp_path: Path, code: int, *, hold: bool = False) -> subprocess.Popen[str]:
    storage = str(tmp_path / "runs")
    update_status_file(f"{storage}/ns/done/status.json", lambda s: s.update(attempt=2))
    env = pod.PodContract(
        job="done", namespace="ns", attempt=2, storage=storage, master_port=free_port()
    ).to_env()
    if hold:
        env[pod.HOLD_AFTER_SUCCESS] = "1"
    command = [
        *SPOTRUN,
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        sys.executable,
        "-c",
        f"raise SystemExit({code})",
    ]
    return subprocess.Popen(command, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)


def status(tmp_path: Path) -> dict[str, object]:
    return read_status_file(str(tmp_path / "runs/ns/done/status.json"))


def test_success_is_recorded_in_the_status_with_the_attempt(tmp_path: Path) -> None:
    proc = launcher(tmp_path, 0)
    assert proc.wait(60) == 0
    completion = status(tmp_path)["completion"]
    assert isinstance(completion, dict) and completion["attempt"] == 2 and "time" in completion


def test_a_failure_records_no_completion(tmp_path: Path) -> None:
    proc = launcher(tmp_path, 3)
    assert proc.wait(60) == 3
    assert "completion" not in status(tmp_path)


def test_hold_after_success_keeps_the_launcher_alive_until_sigterm(tmp_path: Path) -> None:
    proc = launcher(tmp_path, 0, hold=True)
    try:
        wait_for(lambda: "completion" in status(tmp_path), 60, "completion to be recorded")
        assert proc.poll() is None, "the launcher exited although it was asked to hold"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert (
            proc.stderr is not None
            and "holding until the operator stops this pod" in proc.stderr.read()
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
