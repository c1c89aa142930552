"""A resumed run continues exactly where its checkpoint left it (2 ranks, gloo on CPU)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from spotrun.contract import EXIT_PREEMPTED
from tests.runtime.helpers import Job, send, wait_for

STEPS = 24


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(path, weights_only=True))


def assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after resume"


def test_sigkilled_group_resumes_bitwise_identical(tmp_path: Path) -> None:
    reference = Job(str(tmp_path / "ref"))
    code, out = reference.run(
        {"steps": STEPS, "checkpoint_every": 4, "out": str(tmp_path / "ref.pt")}
    )
    assert code == 0, out

    job = Job(str(tmp_path / "runs"))
    code, out = job.run(
        {"steps": STEPS, "checkpoint_every": 4, "kill_after_step": 12, "kill_rank": 1}
    )
    assert code == 128 + signal.SIGKILL, out
    status = job.status()
    assert status["latestCheckpoint"]["step"] == 12
    assert not (tmp_path / "resumed.pt").exists()

    code, out = job.run(
        {"steps": STEPS, "checkpoint_every": 4, "out": str(tmp_path / "resumed.pt")},
        attempt=1,
        resume_from=job.latest_uri(),
    )
    assert code == 0, out
    assert "resumed at step 13" in out
    assert_bitwise_equal(tmp_path / "ref.pt", tmp_path / "resumed.pt")


def test_sigterm_commits_a_final_checkpoint_at_the_current_step(tmp_path: Path) -> None:
    reference = Job(str(tmp_path / "ref"))
    code, out = reference.run(
        {"steps": 60, "checkpoint_every": 1000, "out": str(tmp_path / "ref.pt")}
    )
    assert code == 0, out

    job = Job(str(tmp_path / "runs"))
    config = {"steps": 60, "checkpoint_every": 1000, "step_seconds": 0.05}
    proc = job.start(config)
    wait_for(
        lambda: job.status().get("lastMetrics", {}).get("step", -1) >= 15,
        60,
        "training to reach step 15",
    )
    send(proc, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, out
    status = job.status()
    final_step = status["latestCheckpoint"]["step"]
    # The notice cost no work: the final checkpoint is the last step any rank trained.
    assert final_step == status["lastMetrics"]["step"], status
    assert final_step >= 15

    code, out = job.run(
        {**config, "step_seconds": 0, "out": str(tmp_path / "resumed.pt")},
        attempt=1,
        resume_from=job.latest_uri(),
    )
    assert code == 0, out
    assert f"resumed at step {final_step + 1}" in out
    assert_bitwise_equal(tmp_path / "ref.pt", tmp_path / "resumed.pt")
    assert os.path.exists(job.root)
