"""The checkpoint protocol on real storage: commit rule, corruption, retention, GCS, DCP."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.fixtures.gcs import GcsEmulator
from tests.runtime.helpers import Job


def ckpt(job: Job, seq: int) -> Path:
    return Path(job.root) / f"ckpt-{seq:06d}"


def committed_seqs(job: Job) -> list[int]:
    return sorted(
        int(p.name[5:]) for p in Path(job.root).glob("ckpt-*") if (p / "manifest.json").exists()
    )


@pytest.fixture
def six_checkpoints(tmp_path: Path) -> Job:
    job = Job(str(tmp_path / "runs"))
    code, out = job.run({"steps": 6, "use_cadence": False}, nproc=1)
    assert code == 0, out
    assert committed_seqs(job) == [0, 1, 2, 3, 4, 5]
    return job


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def swap_for_valid_pickle(path: Path) -> None:
    torch.save({"kind": "replicated", "tensors": {}, "skeleton": {"step": 999}}, path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda job: flip_byte(ckpt(job, 5) / "rank-00000.pt"),
        lambda job: (ckpt(job, 5) / "rank-00000.pt").write_bytes(
            (ckpt(job, 5) / "rank-00000.pt").read_bytes()[:100]
        ),
        lambda job: swap_for_valid_pickle(ckpt(job, 5) / "rank-00000.pt"),
        lambda job: (ckpt(job, 5) / "rank-00000.pt").unlink(),
        lambda job: flip_byte(ckpt(job, 5) / "manifest.json"),
        lambda job: (ckpt(job, 5) / "manifest.json").write_text('{"truncated": '),
    ],
    ids=[
        "bit-flipped-shard",
        "truncated-shard",
        "valid-pickle-wrong-bytes",
        "missing-shard",
        "bit-flipped-manifest",
        "truncated-manifest",
    ],
)
def test_damaged_checkpoint_is_caught_before_loading_and_falls_back(
    six_checkpoints: Job, damage: object
) -> None:
    job = six_checkpoints
    latest = job.latest_uri()
    damage(job)  # type: ignore[operator]
    code, out = job.run({"steps": 8, "use_cadence": False}, nproc=1, attempt=1, resume_from=latest)
    assert code == 0, out
    assert "resumed at step 5" in out  # from ckpt 4 (step 4), not from step 0
    assert "not usable" in out
    corrupt = [c for c in job.status()["conditions"] if c["type"] == "CheckpointCorrupt"]
    assert corrupt and corrupt[0]["status"] == "True" and "ckpt-000005" in corrupt[0]["message"]


def test_no_valid_checkpoint_refuses_to_restart_from_step_zero(six_checkpoints: Job) -> None:
    job = six_checkpoints
    for seq in range(6):
        flip_byte(ckpt(job, seq) / "rank-00000.pt")
    code, out = job.run({"steps": 8}, nproc=1, attempt=1, resume_from=job.latest_uri())
    assert code != 0
    assert "Refusing to restart from step 0" in out
    assert "resumed" not in out


def test_rank_killed_mid_upload_leaves_no_committed_checkpoint(tmp_path: Path) -> None:
    job = Job(str(tmp_path / "runs"))
    config = {"steps": 12, "checkpoint_every": 4, "extra_mb": 192, "use_cadence": False}
    code, out = job.run({**config, "kill_before_upload_step": 4, "kill_rank": 1})
    assert code == 128 + signal.SIGKILL, out
    leftover = ckpt(job, 1)
    assert leftover.exists(), "rank 0 should have started writing checkpoint 1"
    assert not (leftover / "rank-00001.done.json").exists(), (
        "rank 1 finished its upload before the kill"
    )
    assert not (leftover / "manifest.json").exists()
    assert job.status()["latestCheckpoint"]["seq"] == 0

    code, out = job.run(
        {**config, "out": str(tmp_path / "w.pt")},
        attempt=1,
        resume_from=job.latest_uri(),
        timeout=300,
    )
    assert code == 0, out
    assert "resumed at step 1" in out
    assert not (leftover / "manifest.json").exists()
    assert committed_seqs(job)[-1] > 1 and 1 not in committed_seqs(job)
    assert [c["seq"] for c in job.status()["checkpoints"]] == [s for s in committed_seqs(job)]


@pytest.mark.parametrize(
    ("order", "expected_best_steps"),
    [("max", [5, 4]), ("min", [0, 1])],
)
def test_retention_on_storage_keeps_latest_and_best(
    tmp_path: Path, order: str, expected_best_steps: list[int]
) -> None:
    # The workload's loss falls, so score by step: higher step = higher "score".
    job = Job(
        str(tmp_path / "runs"),
        checkpoint={"numToKeep": 2, "scoreAttribute": "step", "scoreOrder": order},
    )
    code, out = job.run({"steps": 6, "use_cadence": False}, nproc=1)
    assert code == 0, out
    status = job.status()
    assert [c["step"] for c in status["bestCheckpoints"]] == expected_best_steps
    kept = sorted({5, *expected_best_steps})
    assert committed_seqs(job) == kept
    assert [c["step"] for c in status["checkpoints"]] == kept


def test_save_load_and_retention_on_gcs_emulator(gcs: GcsEmulator, tmp_path: Path) -> None:
    import fsspec

    bucket = gcs.new_bucket()
    job = Job(bucket, checkpoint={"numToKeep": 2})
    code, out = job.run({"steps": 5, "use_cadence": False})
    assert code == 0, out
    fs = fsspec.filesystem("gs", token="anon")
    names = sorted(
        p.rsplit("/", 1)[-1] for p in fs.ls(job.root.removeprefix("gs://"), refresh=True)
    )
    assert names == ["ckpt-000003", "ckpt-000004", "status.json"]
    status = json.loads(fs.cat(f"{job.root}/status.json"))
    assert status["latestCheckpoint"]["uri"] == f"{job.root}/ckpt-000004"

    code, out = job.run(
        {"steps": 7, "use_cadence": False, "out": str(tmp_path / "w.pt")},
        attempt=1,
        resume_from=status["latestCheckpoint"]["uri"],
    )
    assert code == 0, out
    assert "resumed at step 5" in out
    fs.invalidate_cache()
    manifest = json.loads(fs.cat(f"{job.root}/ckpt-000006/manifest.json"))
    assert manifest["step"] == 6 and {f["rank"] for f in manifest["files"]} == {0, 1}


@pytest.mark.parametrize("restore_world", [1, 2])
def test_sharded_state_saved_by_two_ranks_restores_onto_any_world_size(
    tmp_path: Path, restore_world: int
) -> None:
    job = Job(str(tmp_path / "runs"))
    code, out = job.run({"mode": "save"}, nproc=2, workload="sharded_state.py")
    assert code == 0, out
    manifest = json.loads((ckpt(job, 0) / "manifest.json").read_text())
    assert manifest["kind"] == "dcp" and {f["rank"] for f in manifest["files"]} == {0, 1}
    code, out = job.run(
        {"mode": "load"},
        nproc=restore_world,
        attempt=1,
        resume_from=job.latest_uri(),
        workload="sharded_state.py",
    )
    assert code == 0, out
    assert out.count(f"on world size {restore_world}") == restore_world
    assert os.path.isdir(job.root)


def test_from_uri_opens_a_committed_checkpoint_and_refuses_a_damaged_one(
    six_checkpoints: Job,
) -> None:
    from spotrun import Checkpoint
    from spotrun.store.commit import CheckpointCorruptError

    latest = six_checkpoints.latest_uri()
    checkpoint = Checkpoint.from_uri(latest)
    assert checkpoint.step == 5 and checkpoint.to_dict()["step"] == 5
    flip_byte(ckpt(six_checkpoints, 5) / "rank-00000.pt")
    with pytest.raises(CheckpointCorruptError, match="sha256"):
        Checkpoint.from_uri(latest)
