"""A resumed run continues exactly where its checkpoint left it (2 ranks, gloo on CPU)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from spotrun.contract import EXIT_PREEMPTED
from tests.fixtures.gcs import free_port
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


def test_a_notice_to_one_node_preempts_every_node_of_the_group(tmp_path: Path) -> None:
    """Only node 0's launcher gets SIGTERM; node 1's workers exit 75 because the group agreed
    on the notice, and their session vouches for it, so node 1's launcher exits 75 too."""
    job = Job(str(tmp_path / "runs"))
    config = {"steps": 400, "checkpoint_every": 1000, "step_seconds": 0.05}
    port = free_port()
    nodes = [
        job.start(config, nproc=1, replicas=2, node_rank=rank, master_port=port)
        for rank in range(2)
    ]
    try:
        wait_for(
            lambda: job.status().get("lastMetrics", {}).get("step", -1) >= 5,
            90,
            "training to reach step 5",
        )
        send(nodes[0], signal.SIGTERM)
        outs = [node.communicate(timeout=60)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()
    assert [node.returncode for node in nodes] == [EXIT_PREEMPTED, EXIT_PREEMPTED], outs
    assert "received SIGTERM" not in outs[1], outs[1]
    assert "without a preemption notice" not in outs[1], outs[1]
