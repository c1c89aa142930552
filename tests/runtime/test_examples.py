"""The Ray-style examples run under `spotrun launch --function`, and resume bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from spotrun.contract import EXIT_PREEMPTED
from spotrun.ledger.sink import update_status_file
from tests.runtime.helpers import ROOT, SPOTRUN, Job, wait_for

pytestmark = pytest.mark.timeout(400)


def start(
    job: Job,
    function: str,
    config: dict[str, Any],
    *,
    attempt: int = 0,
    resume_from: str | None = None,
) -> subprocess.Popen[str]:
    env = job.env(config, nproc=2, attempt=attempt, resume_from=resume_from)
    # What the supervisor (operator or local mode) does before it starts an attempt.
    update_status_file(f"{job.root}/status.json", lambda status: status.update(attempt=attempt))
    command = [*SPOTRUN, "launch", "--nproc-per-node", "2", "--function", function]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run(job: Job, function: str, config: dict[str, Any], **kwargs: Any) -> int:
    process = start(job, function, config, **kwargs)
    try:
        out, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(f"{function} did not finish:\n{out}") from None
    assert process.returncode in (0, EXIT_PREEMPTED), out
    return process.returncode


def reported(job: Job) -> list[dict[str, Any]]:
    """The metrics of every committed checkpoint of the job, oldest first."""
    manifests = sorted(Path(job.root).glob("ckpt-*/manifest.json"))
    return [json.loads(path.read_text())["metrics"] for path in manifests]


def test_train_func_reports_a_checkpoint_every_epoch(tmp_path: Path) -> None:
    job = Job(str(tmp_path / "runs"))
    run(job, "examples.train_linear:train_func", {"num_epochs": 3})
    metrics = reported(job)
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_the_resume_example_continues_where_its_checkpoint_left_it(tmp_path: Path) -> None:
    function = "examples.train_linear_resume:train_func"
    reference = Job(str(tmp_path / "reference"))
    run(reference, function, {"num_epochs": 5})

    job = Job(str(tmp_path / "runs"))
    run(job, function, {"num_epochs": 2})
    run(job, function, {"num_epochs": 5}, attempt=1, resume_from=job.latest_uri())
    # Each loss comes from the weights of the step before: the epochs after the resume
    # match only if the weights and Adam's state were restored exactly.
    assert reported(job) == reported(reference)
    assert [m["epoch"] for m in reported(job)] == [0, 1, 2, 3, 4]


def test_train_func_steps_preempted_by_sigterm_ends_like_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    function = "examples.train_linear:train_func_steps"
    config = {"steps": 40, "checkpoint_every": 1000, "batch_size": 4}
    reference = Job(str(tmp_path / "reference"))
    run(reference, function, config)

    job = Job(str(tmp_path / "runs"))
    process = start(job, function, {**config, "step_seconds": 0.1})
    try:
        wait_for(
            lambda: (
                Path(job.root, "status.json").exists()
                and job.status().get("lastMetrics", {}).get("step", -1) >= 5
            ),
            120,
            "training to reach step 5",
        )
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == EXIT_PREEMPTED, out
    preempted_at = job.status()["latestCheckpoint"]["step"]
    assert 5 <= preempted_at < 39

    run(job, function, config, attempt=1, resume_from=job.latest_uri())
    # The last loss is computed from the weights after step 38: equal only if the model,
    # Adam and the data loader's position all resumed exactly.
    assert reported(job)[-1] == reported(reference)[-1]
    assert reported(job)[-1]["step"] == 39
