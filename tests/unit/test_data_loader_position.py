"""ResumableDataLoader in one process: ranks simulated by rank/world_size, no session needed."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, WeightedRandomSampler

from spotrun.train.data import ResumableDataLoader

WORLD = 2


class Ids(Dataset[int]):
    """Sample i is i, so a batch says which samples it holds."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def _loaders(n: int, *, world: int = WORLD, **kwargs: Any) -> list[ResumableDataLoader]:
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("shuffle", True)
    return [
        ResumableDataLoader(DataLoader(Ids(n), **kwargs), rank=r, world_size=world, seed=11)
        for r in range(world)
    ]


def _ids(batch: torch.Tensor) -> list[int]:
    ids: list[int] = batch.tolist()
    return ids


def _uninterrupted(n: int, epochs: int, **kwargs: Any) -> list[list[list[int]]]:
    """Per rank, the batches of `epochs` full epochs."""
    out: list[list[list[int]]] = []
    for loader in _loaders(n, **kwargs):
        batches: list[list[int]] = []
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            batches.extend(_ids(b) for b in loader)
        out.append(batches)
    return out


@pytest.mark.parametrize(
    ("n", "stop_after", "kwargs"),
    [
        (11, 2, {}),
        (11, 3, {"drop_last": True}),
        (12, 1, {"shuffle": False}),
        (12, 3, {}),  # the checkpoint falls on the last batch of the epoch
        (9, 1, {"batch_size": 3}),
    ],
)
def test_a_run_resumed_mid_epoch_trains_on_the_same_batches_as_an_uninterrupted_run(
    n: int, stop_after: int, kwargs: dict[str, Any]
) -> None:
    epochs = 2
    expected = _uninterrupted(n, epochs, **kwargs)

    first = _loaders(n, **kwargs)
    seen: list[list[list[int]]] = [[] for _ in range(WORLD)]
    states = []
    for rank, loader in enumerate(first):
        loader.set_epoch(0)
        for step, batch in enumerate(loader, start=1):
            seen[rank].append(_ids(batch))
            if step == stop_after:
                break
        states.append(loader.state_dict())
    assert states[0] == states[1], "every rank must record the same position"

    for rank, loader in enumerate(_loaders(n, **kwargs)):
        loader.load_state_dict(states[rank])
        for epoch in range(loader.epoch, epochs):
            loader.set_epoch(epoch)
            seen[rank].extend(_ids(b) for b in loader)
    assert seen == expected


def test_the_position_counts_batches_received_by_the_loop() -> None:
    loader = _loaders(20)[0]
    loader.set_epoch(3)
    iterator = iter(loader)
    assert loader.state_dict() == {"epoch": 3, "batches": 0, "samples": 0}
    next(iterator)
    next(iterator)
    assert loader.state_dict() == {"epoch": 3, "batches": 2, "samples": 2 * 2 * WORLD}


def test_a_finished_pass_leaves_the_position_at_the_start_of_the_next_pass() -> None:
    loader = _loaders(8)[0]
    loader.set_epoch(1)
    assert len(list(loader)) == len(loader) == 2
    assert loader.state_dict() == {"epoch": 1, "batches": 0, "samples": 0}


def test_a_checkpoint_taken_right_after_resume_keeps_the_loaded_position() -> None:
    saved = {"epoch": 2, "batches": 3, "samples": 12}
    loader = _loaders(30)[0]
    loader.load_state_dict(saved)
    assert loader.epoch == 2
    assert loader.state_dict() == saved
    iterator = iter(loader)
    next(iterator)
    assert loader.state_dict() == {"epoch": 2, "batches": 4, "samples": 16}


def test_moving_to_the_next_epoch_drops_the_resumed_position() -> None:
    loader = _loaders(12)[0]
    loader.load_state_dict({"epoch": 0, "batches": 3, "samples": 12})
    loader.set_epoch(1)
    assert loader.state_dict() == {"epoch": 1, "batches": 0, "samples": 0}
    assert len(list(loader)) == 3


def test_the_ray_style_sampler_set_epoch_selects_the_epoch() -> None:
    a, b = _loaders(16)[0], _loaders(16)[0]
    a.sampler.set_epoch(5)
    b.set_epoch(5)
    assert [_ids(x) for x in a] == [_ids(x) for x in b]
    assert a.state_dict()["epoch"] == 5


def test_a_position_without_samples_assumes_the_same_group() -> None:
    loader = _loaders(20)[0]
    loader.load_state_dict({"epoch": 0, "batches": 2})
    assert loader.state_dict()["samples"] == 2 * 2 * WORLD


def test_a_group_resumed_at_another_world_size_trains_on_every_remaining_sample() -> None:
    n = 26  # 8 consumed by 2 ranks, 18 left for 3 ranks: no padding to account for
    two = _loaders(n, world=2)
    consumed: Counter[int] = Counter()
    for loader in two:
        for step, batch in enumerate(loader, start=1):
            consumed.update(_ids(batch))
            if step == 2:
                break
    state = two[0].state_dict()
    rest: Counter[int] = Counter()
    for loader in _loaders(n, world=3):
        loader.load_state_dict(state)
        for batch in loader:
            rest.update(_ids(batch))
    assert consumed + rest == Counter(range(n))


def test_the_rebuilt_loader_keeps_the_loader_settings() -> None:
    def collate(items: list[int]) -> list[int]:
        return sorted(items)

    loader = ResumableDataLoader(
        DataLoader(Ids(9), batch_size=4, shuffle=False, drop_last=True, collate_fn=collate),
        rank=1,
        world_size=2,
    )
    assert loader.batch_size == 4
    assert loader.loader.collate_fn is collate
    # Rank 1 sees 1, 3, 5, 7, 0 (padding); drop_last keeps one full batch of 4.
    assert list(loader) == [[1, 3, 5, 7]]


class _Stream(IterableDataset[int]):
    def __iter__(self) -> Any:
        return iter(range(3))


def test_datasets_that_cannot_be_sharded_by_index_are_refused_with_a_way_out() -> None:
    with pytest.raises(TypeError, match="map-style dataset"):
        ResumableDataLoader(DataLoader(_Stream(), batch_size=1), rank=0, world_size=1)
    weighted = WeightedRandomSampler([1.0, 2.0], num_samples=2)
    with pytest.raises(TypeError, match="cannot keep a WeightedRandomSampler"):
        ResumableDataLoader(
            DataLoader(Ids(2), batch_size=1, sampler=weighted), rank=0, world_size=1
        )
    with pytest.raises(TypeError, match="built with batch_size"):
        ResumableDataLoader(DataLoader(Ids(2), batch_size=None), rank=0, world_size=1)
