"""The checkpoint ledger on real processes: a reported checkpoint is never lost, and the
status follows what storage really holds (issue #12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.runtime.helpers import Job, manifest_step


def ckpt(job: Job, seq: int) -> Path:
    return Path(job.root) / f"ckpt-{seq:06d}"


def committed_seqs(job: Job) -> list[int]:
    return sorted(
        int(p.name[5:]) for p in Path(job.root).glob("ckpt-*") if (p / "manifest.json").exists()
    )


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def condition(job: Job, type_: str) -> dict[str, str]:
    found = [c for c in job.status().get("conditions", []) if c["type"] == type_]
    assert found, f"no {type_} condition in {job.status().get('conditions')}"
    return found[0]


def test_a_checkpoint_reported_just_before_an_exception_is_committed_and_resumed(
    tmp_path: Path,
) -> None:
    job = Job(str(tmp_path / "runs"))
    # 128 MB per rank still uploading when the exception comes: it used to be dropped.
    config = {
        "steps": 10,
        "checkpoint_every": 3,
        "use_cadence": False,
        "extra_mb": 256,
        "raise_after_step": 3,
    }
    code, out = job.run(config, nproc=2)
    assert code != 0, out
    assert "the training code failed after step 3" in out
    assert "committing what it reported first" in out
    latest = job.status()["latestCheckpoint"]
    assert latest["step"] == 3, out

    code, out = job.run(
        {**config, "raise_after_step": None}, nproc=2, attempt=1, resume_from=latest["uri"]
    )
    assert code == 0, out
    assert "resumed at step 4" in out


@pytest.mark.parametrize("kind", ["dict", "directory"])
def test_rank_1_alone_may_carry_the_checkpoint(tmp_path: Path, kind: str) -> None:
    job = Job(str(tmp_path / "runs"))
    out_file = tmp_path / "resumed.json"
    config = {"steps": 2, "carriers": {"0": None, "1": kind}, "out": str(out_file)}
    code, out = job.run(config, nproc=2, workload="carriers.py")
    assert code == 0, out
    latest = job.status()["latestCheckpoint"]
    manifest = json.loads((Path(job.root) / Path(latest["uri"]).name / "manifest.json").read_text())
    assert manifest["kind"] == ("replicated" if kind == "dict" else "directory")

    code, out = job.run(
        config, nproc=2, workload="carriers.py", attempt=1, resume_from=latest["uri"]
    )
    assert code == 0, out
    resumed = json.loads(out_file.read_text())["resumed"]
    if kind == "dict":
        assert resumed == {"dict": {"step": 1, "rank": 1}}
    else:
        assert resumed["files"] == {"state.txt": "step 1 from rank 1"}


def test_ranks_passing_different_kinds_of_checkpoint_are_told_at_report(tmp_path: Path) -> None:
    job = Job(str(tmp_path / "runs"))
    config = {"steps": 2, "carriers": {"0": "dict", "1": "directory"}}
    code, out = job.run(config, nproc=2, workload="carriers.py")
    assert code != 0
    assert "different kinds of checkpoint" in out
    assert "dict from ranks [0]" in out and "directory from ranks [1]" in out
    assert committed_seqs(job) == []


def test_a_step_metric_that_goes_back_does_not_order_the_checkpoints(tmp_path: Path) -> None:
    job = Job(str(tmp_path / "runs"))
    config = {"steps": 4, "use_cadence": False, "step_metric": [5, 6, 2, 3]}
    code, out = job.run(config, nproc=1)
    assert code == 0, out
    status = job.status()
    # Every checkpoint was recorded, in spotrun's order, none refused by the fence.
    assert [c["seq"] for c in status["checkpoints"]] == [0, 1, 2, 3]
    assert status["latestCheckpoint"]["seq"] == 3
    assert status["latestCheckpoint"]["metrics"]["step"] == 3
    assert "FencingError" not in out

    code, out = job.run(
        {**config, "steps": 6, "step_metric": [5, 6, 2, 3, 4, 5]},
        nproc=1,
        attempt=1,
        resume_from=status["latestCheckpoint"]["uri"],
    )
    assert code == 0, out
    assert "resumed at step 4" in out


def test_a_fallback_moves_the_ledger_to_what_was_resumed_and_new_checkpoints_are_accepted(
    tmp_path: Path,
) -> None:
    job = Job(str(tmp_path / "runs"))
    code, out = job.run({"steps": 6, "use_cadence": False}, nproc=1)
    assert code == 0, out
    named = job.latest_uri()
    flip_byte(ckpt(job, 5) / "rank-00000.pt")
    flip_byte(ckpt(job, 4) / "rank-00000.pt")

    code, out = job.run({"steps": 8, "use_cadence": False}, nproc=1, attempt=1, resume_from=named)
    assert code == 0, out
    assert "resumed at step 4" in out  # from ckpt 3 (step 3)
    status = job.status()
    corrupt = condition(job, "CheckpointCorrupt")
    assert corrupt["reason"] == "FellBack"
    assert "ckpt-000005" in corrupt["message"] and "ckpt-000004" in corrupt["message"]
    # The checkpoints of steps 4..7 (lower steps than the corrupt ckpt-5's) were all taken.
    latest = status["latestCheckpoint"]
    assert latest["step"] == 7 and latest["seq"] == 9
    assert "FencingError" not in out
    listed = [c["seq"] for c in status["checkpoints"]]
    assert 4 not in listed and 5 not in listed

    code, out = job.run(
        {"steps": 9, "use_cadence": False}, nproc=1, attempt=2, resume_from=latest["uri"]
    )
    assert code == 0, out
    assert "resumed at step 8" in out


def test_the_fallback_itself_is_recorded_before_new_checkpoints(tmp_path: Path) -> None:
    job = Job(str(tmp_path / "runs"))
    code, out = job.run({"steps": 3, "use_cadence": False}, nproc=1)
    assert code == 0, out
    named = job.latest_uri()
    flip_byte(ckpt(job, 2) / "rank-00000.pt")
    # Resume and stop before any new checkpoint: the ledger already names the resumed one.
    code, out = job.run({"steps": 2, "use_cadence": False}, nproc=1, attempt=1, resume_from=named)
    assert code == 0, out
    latest = job.status()["latestCheckpoint"]
    assert latest["uri"].endswith("ckpt-000001")
    assert latest["fellBackFrom"] == named


def test_a_lost_status_resumes_from_the_newest_committed_checkpoint_and_deletes_none(
    tmp_path: Path,
) -> None:
    job = Job(str(tmp_path / "runs"), checkpoint={"numToKeep": 2})
    code, out = job.run({"steps": 5, "use_cadence": False}, nproc=1)
    assert code == 0, out
    assert committed_seqs(job) == [3, 4]
    (Path(job.root) / "status.json").unlink()

    # No resume point named (a new status): storage is the truth behind it.
    code, out = job.run({"steps": 7, "use_cadence": False}, nproc=1, attempt=1, resume_from=None)
    assert code == 0, out
    assert "resumed at step 5" in out
    repaired = condition(job, "LedgerRepaired")
    assert repaired["reason"] == "Rediscovered" and "ckpt-000004" in repaired["message"]
    assert job.status()["latestCheckpoint"]["step"] == 6


def test_a_committed_checkpoint_the_status_never_recorded_is_resumed_from(tmp_path: Path) -> None:
    job = Job(str(tmp_path / "runs"))
    code, out = job.run({"steps": 4, "use_cadence": False}, nproc=1)
    assert code == 0, out
    # The status as if the last commit's record never landed: it names ckpt-2.
    status_path = Path(job.root) / "status.json"
    status = json.loads(status_path.read_text())
    status["latestCheckpoint"] = status["checkpoints"][-2]
    status_path.write_text(json.dumps(status))

    code, out = job.run(
        {"steps": 6, "use_cadence": False},
        nproc=1,
        attempt=1,
        resume_from=status["latestCheckpoint"]["uri"],
    )
    assert code == 0, out
    assert "resumed at step 4" in out  # from ckpt-3, newer than the one named
    assert "holds the newer committed checkpoint ckpt-000003" in out


def test_half_written_checkpoints_of_earlier_attempts_are_removed(tmp_path: Path) -> None:
    job = Job(str(tmp_path / "runs"))
    code, out = job.run({"steps": 2, "use_cadence": False}, nproc=1)
    assert code == 0, out
    # What a killed attempt leaves: a numbered folder with a shard and no manifest.
    orphan = ckpt(job, 2)
    shutil.copytree(ckpt(job, 1), orphan)
    (orphan / "manifest.json").unlink()

    code, out = job.run(
        {"steps": 4, "use_cadence": False}, nproc=1, attempt=1, resume_from=job.latest_uri()
    )
    assert code == 0, out
    assert not orphan.exists()
    assert committed_seqs(job) == [0, 1, 3, 4]
    assert manifest_step(job, 3) == 2


def test_last_metrics_are_the_last_report_when_the_job_ends(tmp_path: Path) -> None:
    job = Job(str(tmp_path / "runs"))
    config = {"steps": 7, "checkpoint_every": 100, "use_cadence": False}
    # One progress record an hour: only the end of the run can bring lastMetrics up to date.
    code, out = job.run(config, nproc=1, extra_env={"SPOTRUN_PROGRESS_SECONDS": "3600"})
    assert code == 0, out
    assert job.status()["lastMetrics"]["step"] == 6


def test_resume_from_another_jobs_checkpoint_starts_there_and_records_its_own(
    tmp_path: Path,
) -> None:
    source = Job(str(tmp_path / "runs"), name="source")
    code, out = source.run({"steps": 3, "use_cadence": False}, nproc=1)
    assert code == 0, out
    origin = source.latest_uri()

    job = Job(str(tmp_path / "runs"), name="finetune")
    code, out = job.run({"steps": 6, "use_cadence": False}, nproc=1, resume_from=origin)
    assert code == 0, out
    assert "resumed at step 3" in out
    latest = job.status()["latestCheckpoint"]
    # Its own checkpoints, under its own folder; the source's are left as they were.
    assert latest["uri"].startswith(job.root + "/") and latest["step"] == 5
    assert committed_seqs(source) == [0, 1, 2]
    assert source.latest_uri() == origin


def test_should_checkpoint_asks_for_checkpoints_on_its_own_in_a_real_run(tmp_path: Path) -> None:
    job = Job(str(tmp_path / "runs"))
    # Every 1000 steps by the code's own rule (only step 0 here); a failure every second on
    # average makes the Young/Daly interval short, so should_checkpoint() says yes often.
    config = {"steps": 40, "checkpoint_every": 1000, "step_seconds": 0.05}
    code, out = job.run(config, nproc=2, extra_env={"SPOTRUN_MTBF_SECONDS": "1"})
    assert code == 0, out
    steps = [manifest_step(job, seq) for seq in committed_seqs(job)]
    assert steps[0] == 0 and len(steps) >= 3, steps
