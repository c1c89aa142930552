"""Training state on a GPU: the async snapshot copies it off the device, a preemption notice
commits it, and the resumed run continues bitwise where it stopped (NCCL-capable group)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from spotrun.contract import EXIT_PREEMPTED
from tests.runtime.helpers import PYTHONPATH, SPOTRUN, Job, send, wait_for, writer_config
from tests.runtime.test_resume import assert_bitwise_equal

GROUP_PROBE = """
import torch, torch.distributed as dist
from spotrun.train import group
backend = group.init_process_group()
cpu = torch.ones(3)
dist.all_reduce(cpu)
gpu = torch.ones(3, device="cuda")
dist.all_reduce(gpu)
box = [{"resume": "gs://b/ns/job/ckpt-000001"}]
dist.broadcast_object_list(box, src=0)
print("backend", backend, "cpu", cpu.tolist(), "gpu", gpu.cpu().tolist(), "box", box[0]["resume"])
dist.destroy_process_group()
"""


def test_process_group_carries_cpu_and_cuda_collectives(tmp_path: Path) -> None:
    """spotrun's agreement collectives use CPU tensors; NCCL alone cannot carry them."""
    job = Job(str(tmp_path / "runs"))
    env = job.env({}, nproc=1, attempt=1, resume_from=None)
    probe = tmp_path / "probe.py"
    probe.write_text(GROUP_PROBE)
    out = subprocess.run(
        [*SPOTRUN, "launch", "--nproc-per-node", "1", "--", sys.executable, str(probe)],
        env={**env, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "backend cpu:gloo,cuda:nccl cpu [1.0, 1.0, 1.0] gpu [1.0, 1.0, 1.0]" in out.stdout
    assert "box gs://b/ns/job/ckpt-000001" in out.stdout


def test_gpu_state_sigterm_final_checkpoint_and_bitwise_resume(tmp_path: Path) -> None:
    config = {"steps": 60, "checkpoint_every": 10, "extra_mb": 64}
    reference = Job(str(tmp_path / "ref"))
    code, out = reference.run({**config, "out": str(tmp_path / "ref.pt")}, nproc=1)
    assert code == 0, out
    assert "rank 0 trains on cuda:0" in out

    job = Job(str(tmp_path / "runs"))
    proc = job.start({**config, "step_seconds": 0.05}, nproc=1)
    wait_for(
        lambda: job.status().get("lastMetrics", {}).get("step", -1) >= 25,
        120,
        "training to reach step 25",
    )
    send(proc, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out
    status = job.status()
    final_step = status["latestCheckpoint"]["step"]
    assert final_step == status["lastMetrics"]["step"], status
    assert final_step >= 25

    code, out = job.run(
        {**config, "out": str(tmp_path / "resumed.pt")},
        nproc=1,
        attempt=1,
        resume_from=job.latest_uri(),
    )
    assert code == 0, out
    assert f"resumed at step {final_step + 1}" in out
    assert_bitwise_equal(tmp_path / "ref.pt", tmp_path / "resumed.pt")


def test_more_workers_than_gpus_fails_at_once_with_the_fix(tmp_path: Path) -> None:
    """A worker without a GPU would join with gloo while the others use NCCL, and hang."""
    import torch

    job = Job(str(tmp_path / "runs"))
    code, out = job.run({"steps": 4}, nproc=torch.cuda.device_count() + 1, timeout=120)
    assert code != 0, out
    assert "has no GPU" in out and "nprocPerNode" in out, out


def test_a_gpu_state_is_snapshotted_into_a_pinned_buffer_until_it_is_handed_over(
    tmp_path: Path,
) -> None:
    """The snapshot buffer is page-locked for a GPU state (copies at the copy engines' speed),
    and unpinned before a warm recovery takes it away, since its new owner may unmap it."""
    import torch

    from spotrun.train.writer import WriterClient

    writer = WriterClient(writer_config(tmp_path))
    try:
        state = {0: torch.randn(3 << 20, device="cuda"), 1: torch.arange(7, device="cuda")}
        writer.save(0, "replicated", None, state, write=[])
        writer.drain_save()
        assert writer.snapshot is not None
        slots, _, buffer = writer.snapshot
        view = torch.frombuffer(buffer, dtype=torch.uint8)
        assert view.is_pinned(), "CUDA does not see the snapshot buffer as pinned"
        for slot in slots:
            size = slot.count * state[slot.index].element_size()
            held = view[slot.offset : slot.offset + size].view(slot.dtype).view(slot.shape)
            assert torch.equal(held, state[slot.index].cpu())
        assert writer.detach_snapshot() is not None
        assert not view.is_pinned()
    finally:
        writer.close()
