"""`spotrun run` and the ledger: one supervisor per job, status writes that lose nothing on a
bucket, and a fallback shown to the person running the job (issue #12)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from spotrun.ledger.sink import update_status_file
from spotrun.local import ownership
from tests.fixtures.gcs import GcsEmulator
from tests.runtime.helpers import wait_for
from tests.runtime.test_local_mode import run, start, status_of, trainjob

pytestmark = pytest.mark.timeout(600)


def test_a_second_supervisor_of_the_same_job_is_refused_and_a_crashed_one_lets_go(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "runs"
    path = trainjob(
        tmp_path, config={"steps": 100000, "step_seconds": 0.05, "checkpoint_every": 50}
    )
    first = start("run", str(path), "--storage", str(storage), "--no-live")
    try:
        wait_for(lambda: "lastMetrics" in status_of(storage), 120, "the first run to train")
        code, out = run("run", str(path), "--storage", str(storage), "--no-live", timeout=60)
        assert code == 2, out
        assert f"already being run by pid {first.pid}" in out
        assert "stop that run first" in out
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # The kernel released the crashed owner's lock: the job can be taken again.
    held = ownership.acquire(str(storage / "default" / "linear-demo"))
    held.release()


def test_a_lease_on_a_bucket_refuses_a_second_owner_until_it_expires(
    gcs: GcsEmulator,
) -> None:
    root = f"{gcs.new_bucket()}/default/job"
    first = ownership.acquire(root, now=1000.0)
    with pytest.raises(ownership.JobOwnedError, match="already being run by pid"):
        ownership.acquire(root, now=1000.0 + ownership.LEASE_SECONDS / 2)
    # The owner crashed (stopped renewing): once the lease expired, another may take it.
    second = ownership.acquire(root, now=1000.0 + ownership.LEASE_SECONDS + 1)
    with pytest.raises(ownership.JobOwnedError, match="lost the ownership"):
        first.renew(now=1000.0 + ownership.LEASE_SECONDS * 2)
    second.release()


def _bump(url: str, field: str, times: int, env: dict[str, str]) -> None:
    os.environ.update(env)

    def mutate(status: dict[str, int]) -> None:
        status[field] = int(status.get(field, 0)) + 1

    for _ in range(times):
        update_status_file(url, mutate)


def test_concurrent_status_writers_on_a_bucket_lose_no_update(gcs: GcsEmulator) -> None:
    url = f"{gcs.new_bucket()}/default/job/status.json"
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_bump, args=(url, f"w{i}", 25, gcs.env)) for i in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(180)
        assert w.exitcode == 0
    final = update_status_file(url, lambda status: None)
    assert (final.get("w0"), final.get("w1")) == (25, 25)


def test_spotrun_run_shows_a_fallback_past_a_corrupt_checkpoint(tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    path = trainjob(tmp_path, config={"steps": 30, "checkpoint_every": 10, "seed": 0})
    code, out = run("run", str(path), "--storage", str(storage), "--no-live")
    assert code == 0, out
    root = storage / "default" / "linear-demo"
    latest = status_of(storage)["latestCheckpoint"]
    # Damage the newest checkpoint, and make the job unfinished again so the next run carries on.
    shard = root / Path(latest["uri"]).name / "rank-00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    status = json.loads((root / "status.json").read_text())
    for key in ("state", "completionTime", "completion"):
        status.pop(key, None)
    status["conditions"] = [c for c in status["conditions"] if c["type"] != "Succeeded"]
    (root / "status.json").write_text(json.dumps(status))

    code, out = run("run", str(path), "--storage", str(storage), "--no-live")
    assert code == 0, out
    assert f"{Path(latest['uri']).name} failed verification" in out
    assert "fell back" in out.lower()
