"""Elastic groups in `spotrun run` on real processes: shrink to the capacity left, grow back.

A 4-replica job with `elastic: {minReplicas: 2, batch: global}` loses two replicas whose
capacity stays away (`--unavailable-for`): the group goes on with 3, then 2, and grows back
to 4 when they return. With the global batch kept, the run is the fault-free run's: every
sample trained on exactly once per epoch (counted in the replicated state, so steps redone
after a loss are not counted twice) and the same loss curve, within float tolerance.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.runtime.test_local_mode import run, status_of

pytestmark = pytest.mark.timeout(900)

JOB = "elastic-demo"
CONFIG = {"samples": 256, "batch": 4, "epochs": 10, "checkpoint_every": 4, "step_seconds": 0.2}


def elastic_job(
    folder: Path, batch: str = "global", *, replicas: int = 4, spares: int = 0, **config: Any
) -> Path:
    manifest = {
        "apiVersion": "spotrun.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": JOB},
        "spec": {
            "replicas": replicas,
            **({"spares": spares} if spares else {}),
            "elastic": {"minReplicas": 2, "waitSeconds": 1, "batch": batch},
            "trainer": {
                "image": "spotrun-runtime:dev",
                "function": "tests.runtime.workloads.elastic_samples:train",
            },
            "config": {**CONFIG, **config, "out": str(folder / "final.pt")},
            "failurePolicy": {
                "maxFailures": 0,
                "progressDeadlineSeconds": 120,
                "backoff": {"initialSeconds": 1, "maxSeconds": 5},
            },
        },
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def final_state(folder: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(folder / "final.pt", weights_only=True)
    return state


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("elastic-reference")
    code, out = run("run", str(elastic_job(folder)), "--storage", str(folder / "runs"))
    assert code == 0, out
    return final_state(folder)


@pytest.fixture(scope="module")
def resized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The same job with two replicas killed 4 s of training apart, away for 15 s each."""
    folder = tmp_path_factory.mktemp("elastic-resized")
    storage = folder / "runs"
    code, out = run(
        "run", str(elastic_job(folder)), "--storage", str(storage),
        "--kill-every", "4s", "--max-injections", "2", "--unavailable-for", "15s",
        "--seed", "1",
    )  # fmt: skip
    assert code == 0, out
    status = status_of(storage, job=JOB)
    assert status["state"] == "Succeeded", status
    return folder, status


def test_the_group_shrinks_to_the_capacity_left_and_grows_back(
    resized: tuple[Path, dict[str, Any]],
) -> None:
    _, status = resized
    resizes = [e for e in status["interruptions"] if e["kind"] == "resize"]
    sizes = [(e["fromReplicas"], e["toReplicas"]) for e in resizes]
    assert min(to for _, to in sizes) == 2, sizes  # never below minReplicas, and it got there
    shrinks = [e for e in resizes if e["reason"] == "CapacityUnavailable"]
    grows = [e for e in resizes if e["reason"] == "CapacityReturned"]
    assert shrinks and grows, sizes
    assert all(t == f - 1 for f, t in sizes if f > t)  # one lost replica at a time
    assert sizes[-1][1] == 4 and status["size"] == "4/4"
    assert all("secondsToRecover" in e for e in status["interruptions"])
    assert status["failures"] == 0 and status["preemptions"] == 2


def test_every_sample_is_trained_on_exactly_once_per_epoch(
    resized: tuple[Path, dict[str, Any]], reference: dict[str, Any]
) -> None:
    folder, _ = resized
    seen = final_state(folder)["seen"]
    assert torch.equal(seen, torch.ones_like(seen)), (seen != 1).nonzero()[:10]
    assert torch.equal(reference["seen"], torch.ones_like(seen))


def test_the_global_batch_keeps_the_fault_free_loss_curve(
    resized: tuple[Path, dict[str, Any]], reference: dict[str, Any]
) -> None:
    folder, _ = resized
    state = final_state(folder)
    assert state["step"] == reference["step"]  # the same number of steps: the same batches
    torch.testing.assert_close(state["curve"], reference["curve"], rtol=1e-4, atol=1e-6)
    for name, value in reference["model"].items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-4, atol=1e-6)


def test_survivors_keep_their_processes_through_every_resize(
    resized: tuple[Path, dict[str, Any]],
) -> None:
    folder, status = resized
    logs = folder / "runs" / "default" / JOB / "logs"
    first = {log.stem: log.read_text() for log in (logs / "attempt-001").glob("replica-*.log")}
    # Replicas never hit by a fault started one worker, in attempt 1, for the whole run.
    whole = [text for text in first.values() if "exiting with code 0" in text]
    assert len(whole) == 2, list(first)
    for text in whole:
        assert len(re.findall(r"started, pid \d+", text)) == 1
        assert text.count("this replica is kept") == int(status["attempt"]) - 1
    # A replica back from its absence joined as a waiting member, its state from memory.
    later = [
        p.read_text()
        for p in logs.glob("attempt-*/replica-*.log")
        if p.parent.name != "attempt-001"
    ]
    assert any("joins the group again" in text for text in later), later


def test_a_spare_fills_the_first_loss_and_the_group_shrinks_only_when_none_is_left(
    tmp_path: Path,
) -> None:
    """spec.spares with spec.elastic: 3 replicas and a spare (pod 3), two kills 4 s of
    training apart, each victim's capacity away for 15 s. The first loss promotes the
    spare (the group stays at 3); the second finds no spare waiting and no capacity, so the
    group goes on with 2; it grows back to 3 when the first victim's pod runs again, and
    the second victim's then waits as the spare."""
    storage = tmp_path / "runs"
    job = elastic_job(tmp_path, replicas=3, spares=1, samples=240, epochs=12)
    code, out = run(
        "run", str(job), "--storage", str(storage),
        "--kill-every", "4s", "--max-injections", "2", "--unavailable-for", "15s",
        "--seed", "1",
        timeout=600,
    )  # fmt: skip
    assert code == 0, out
    status = status_of(storage, job=JOB)
    assert status["state"] == "Succeeded" and status["preemptions"] == 2, status
    sizes = [
        (e["reason"], e["fromReplicas"], e["toReplicas"])
        for e in status["interruptions"]
        if e["kind"] == "resize"
    ]
    assert sizes == [("CapacityUnavailable", 3, 2), ("CapacityReturned", 2, 3)], sizes
    first, second = [e for e in status["interruptions"] if e["kind"] == "preemption"]
    assert first["recovery"] == second["recovery"] == "warm"
    assert status["size"] == "3/3" and status["group"]["replicas"] == 3
    # The spare trained: pod 3 is a member of the first recovery's group or a later one.
    logs = storage / "default" / JOB / "logs"
    spare = [p.read_text() for p in logs.glob("attempt-*/replica-3.log")]
    assert any("joins the group again" in text for text in spare), spare
    # Neither the promotion nor the resizes trained a sample twice or skipped one.
    seen = final_state(tmp_path)["seen"]
    assert torch.equal(seen, torch.ones_like(seen)), (seen != 1).nonzero()[:10]
