"""prepare_data_loader in real groups: a resumed run trains on exactly the batches it had left."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import DataLoader

from spotrun.train.data import ResumableDataLoader
from tests.runtime.helpers import Job
from tests.unit.test_data_loader_position import Ids

pytestmark = pytest.mark.timeout(300)

# Logs the ids of every batch it trains on and reports each step; with `stop_at` it
# reports a checkpoint at that step and exits (as if the group died right after it).
WORKER = """
import json, os, sys
import torch
from torch.utils.data import DataLoader
import spotrun
from spotrun import Checkpoint

ctx = spotrun.get_context()
cfg = ctx.config
loader = spotrun.prepare_data_loader(
    DataLoader(list(range(cfg["samples"])), batch_size=2, shuffle=True,
               num_workers=cfg.get("num_workers", 0)),
    seed=3,
)
checkpoint = spotrun.get_checkpoint()
step = checkpoint.to_dict()["step"] + 1 if checkpoint else 0
log = open(os.path.join(cfg["out"], f"rank-{ctx.world_rank}.jsonl"), "a")
epoch = loader.epoch
while epoch < cfg["epochs"]:
    loader.set_epoch(epoch)
    for batch in loader:
        log.write(json.dumps({"step": step, "epoch": epoch, "ids": batch.tolist()}) + "\\n")
        log.flush()
        if step == cfg.get("stop_at"):
            state = {"step": step, "weights": torch.zeros(1)}
            spotrun.report({"step": step}, checkpoint=Checkpoint.from_dict(state))
            sys.exit(0)
        spotrun.report({"step": step})
        step += 1
    epoch += 1
"""


def _run(job: Job, tmp_path: Path, out: str, config: dict[str, Any], **kwargs: Any) -> None:
    (tmp_path / out).mkdir()
    script = tmp_path / "data_worker.py"
    script.write_text(WORKER)
    code, output = job.run(
        {**config, "out": str(tmp_path / out)}, workload=str(script), timeout=240, **kwargs
    )
    assert code == 0, output


def _batches(folder: Path, rank: int) -> list[dict[str, Any]]:
    lines = (folder / f"rank-{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_group_resumed_mid_epoch_trains_on_the_batches_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    # DataLoader workers prefetch ahead of the loop: the position must not count those.
    config = {"samples": 22, "epochs": 2, "num_workers": 2}
    _run(Job(str(tmp_path / "reference")), tmp_path, "reference", config)

    job = Job(str(tmp_path / "runs"))
    # 6 batches per rank and epoch (11 samples each, padded): stop in the middle of epoch 0.
    _run(job, tmp_path, "first", {**config, "stop_at": 3})
    _run(job, tmp_path, "resumed", config, attempt=1, resume_from=job.latest_uri())

    for rank in range(2):
        reference = _batches(tmp_path / "reference", rank)
        interrupted = _batches(tmp_path / "first", rank) + _batches(tmp_path / "resumed", rank)
        assert [b["step"] for b in interrupted] == list(range(len(reference)))
        assert interrupted == reference


def test_a_group_resumed_with_fewer_ranks_trains_on_each_remaining_sample_once(
    tmp_path: Path,
) -> None:
    # 24 samples, 2 ranks, batch 2: 4 steps consume 16; the one rank left gets the other 8.
    config = {"samples": 24, "epochs": 1}
    job = Job(str(tmp_path / "runs"))
    _run(job, tmp_path, "first", {**config, "stop_at": 3})
    _run(job, tmp_path, "resumed", config, nproc=1, attempt=1, resume_from=job.latest_uri())

    trained: Counter[int] = Counter()
    for rank in range(2):
        for batch in _batches(tmp_path / "first", rank):
            trained.update(batch["ids"])
    for batch in _batches(tmp_path / "resumed", 0):
        trained.update(batch["ids"])
    assert trained == Counter(range(24))


def test_prefetching_loader_workers_do_not_advance_the_position() -> None:
    def loader(rank: int) -> ResumableDataLoader:
        return ResumableDataLoader(
            DataLoader(Ids(40), batch_size=2, shuffle=True, num_workers=2),
            rank=rank,
            world_size=2,
        )

    full = [batch.tolist() for batch in loader(0)]
    first = loader(0)
    iterator = iter(first)
    seen = [next(iterator).tolist() for _ in range(3)]
    # By now the workers have fetched further ahead (prefetch_factor 2 x 2 workers).
    state = first.state_dict()
    del iterator
    assert state == {"epoch": 0, "batches": 3, "samples": 3 * 2 * 2}

    resumed = loader(0)
    resumed.load_state_dict(state)
    assert seen + [batch.tolist() for batch in resumed] == full
