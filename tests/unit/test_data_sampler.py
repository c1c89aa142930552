"""The index math behind prepare_data_loader: which samples each rank sees, and after a resume."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils.data import DistributedSampler

from spotrun.train.data import (
    consumed_samples,
    epoch_order,
    rank_indices,
    remaining_stream,
    shard,
    shard_length,
)

# (dataset_len, world_size, shuffle, drop_last): divisible, padded, dropped, tiny.
LAYOUTS = [
    (12, 2, True, False),
    (12, 3, False, False),
    (10, 4, True, False),
    (10, 4, True, True),
    (7, 2, False, False),
    (7, 3, True, True),
    (3, 4, True, False),
    (1, 2, False, False),
    (16, 1, True, False),
]


@pytest.mark.parametrize(("n", "world", "shuffle", "drop_last"), LAYOUTS)
@pytest.mark.parametrize("epoch", [0, 3])
def test_without_consumption_each_rank_sees_what_distributed_sampler_gives(
    n: int, world: int, shuffle: bool, drop_last: bool, epoch: int
) -> None:
    for rank in range(world):
        reference: DistributedSampler[int] = DistributedSampler(
            range(n),  # type: ignore[arg-type]
            num_replicas=world,
            rank=rank,
            shuffle=shuffle,
            seed=7,
            drop_last=drop_last,
        )
        reference.set_epoch(epoch)
        ours = rank_indices(
            n,
            rank=rank,
            world_size=world,
            epoch=epoch,
            seed=7,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        assert ours == list(reference)


@pytest.mark.parametrize(("n", "world"), [(12, 1), (12, 2), (12, 3), (12, 4), (8, 4)])
def test_every_sample_is_seen_exactly_once_per_epoch_when_divisible(n: int, world: int) -> None:
    seen = Counter(
        index
        for rank in range(world)
        for index in rank_indices(n, rank=rank, world_size=world, epoch=1, seed=3)
    )
    assert seen == Counter(range(n))


@pytest.mark.parametrize(("n", "world"), [(10, 4), (7, 2), (7, 3), (3, 4), (1, 2)])
def test_padding_repeats_the_start_of_the_epoch_order_like_distributed_sampler(
    n: int, world: int
) -> None:
    order = epoch_order(n, epoch=2, seed=5)
    per_rank = [rank_indices(n, rank=r, world_size=world, epoch=2, seed=5) for r in range(world)]
    # Equal shards, so DDP ranks step in lock step...
    assert len({len(indices) for indices in per_rank}) == 1
    # ...every sample at least once, and the extras are the first of the order, cycled.
    seen = Counter(index for indices in per_rank for index in indices)
    assert set(seen) == set(range(n))
    padding = len(per_rank[0]) * world - n
    extras = Counter(seen) - Counter(range(n))
    assert extras == Counter(order[i % n] for i in range(padding))


@pytest.mark.parametrize(("n", "world"), [(10, 4), (7, 3), (3, 2)])
def test_drop_last_drops_the_uneven_tail_and_never_repeats(n: int, world: int) -> None:
    order = epoch_order(n, epoch=0, seed=1)
    per_rank = [
        rank_indices(n, rank=r, world_size=world, epoch=0, seed=1, drop_last=True)
        for r in range(world)
    ]
    seen = [index for indices in per_rank for index in indices]
    assert sorted(seen) == sorted(order[: (n // world) * world])


def test_the_order_depends_on_seed_and_epoch_and_nothing_else() -> None:
    assert epoch_order(50, epoch=1, seed=0) == epoch_order(50, epoch=1, seed=0)
    assert epoch_order(50, epoch=1, seed=0) != epoch_order(50, epoch=2, seed=0)
    assert epoch_order(50, epoch=1, seed=0) != epoch_order(50, epoch=1, seed=1)
    assert epoch_order(5, epoch=9, shuffle=False) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("n", "world", "shuffle", "drop_last"), LAYOUTS)
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_a_resumed_epoch_is_the_tail_of_the_uninterrupted_epoch(
    n: int, world: int, shuffle: bool, drop_last: bool, batch_size: int
) -> None:
    for rank in range(world):
        full = rank_indices(
            n, rank=rank, world_size=world, epoch=4, seed=2, shuffle=shuffle, drop_last=drop_last
        )
        shard_len = shard_length(n, world_size=world, consumed=0, drop_last=drop_last)
        assert shard_len == len(full)
        batches_in_epoch = -(-shard_len // batch_size)
        for batches in range(batches_in_epoch + 1):
            consumed = consumed_samples(
                start=0,
                batches=batches,
                batch_size=batch_size,
                shard_len=shard_len,
                world_size=world,
            )
            resumed = rank_indices(
                n,
                rank=rank,
                world_size=world,
                epoch=4,
                seed=2,
                shuffle=shuffle,
                drop_last=drop_last,
                consumed=consumed,
            )
            assert resumed == full[batches * batch_size :], (rank, batches)
            assert len(resumed) == shard_length(
                n, world_size=world, consumed=consumed, drop_last=drop_last
            )


def test_resuming_twice_in_one_epoch_still_matches_the_uninterrupted_epoch() -> None:
    n, world, batch_size = 23, 2, 2
    full = [rank_indices(n, rank=r, world_size=world, epoch=0) for r in range(world)]
    first = consumed_samples(
        start=0, batches=3, batch_size=batch_size, shard_len=len(full[0]), world_size=world
    )
    middle = rank_indices(n, rank=0, world_size=world, epoch=0, consumed=first)
    second = consumed_samples(
        start=first, batches=2, batch_size=batch_size, shard_len=len(middle), world_size=world
    )
    for rank in range(world):
        tail = rank_indices(n, rank=rank, world_size=world, epoch=0, consumed=second)
        assert tail == full[rank][5 * batch_size :]


@pytest.mark.parametrize(("n", "old_world", "new_world", "batches"), [(20, 2, 4, 3), (21, 4, 3, 2)])
def test_a_group_resumed_at_another_world_size_sees_each_remaining_sample(
    n: int, old_world: int, new_world: int, batches: int
) -> None:
    order = epoch_order(n, epoch=0, seed=0)
    consumed = consumed_samples(
        start=0,
        batches=batches,
        batch_size=2,
        shard_len=shard_length(n, world_size=old_world, consumed=0, drop_last=False),
        world_size=old_world,
    )
    before = Counter(
        index
        for rank in range(old_world)
        for index in rank_indices(n, rank=rank, world_size=old_world, epoch=0)[: batches * 2]
    )
    after = Counter(
        index
        for rank in range(new_world)
        for index in rank_indices(n, rank=rank, world_size=new_world, epoch=0, consumed=consumed)
    )
    assert before == Counter(order[:consumed])
    # Every sample not yet trained on is served; the only extras are the padding, taken
    # from the start of the epoch's order as DistributedSampler pads.
    remaining = Counter(order[consumed:])
    padding = -(n - consumed) % new_world
    assert remaining - after == Counter()
    assert after - remaining == Counter(order[:padding])


def test_a_consumed_epoch_leaves_nothing_to_serve() -> None:
    order = epoch_order(10, epoch=0)
    assert remaining_stream(order, consumed=10, world_size=2) == []
    assert remaining_stream(order, consumed=12, world_size=4) == []
    assert shard_length(10, world_size=4, consumed=12, drop_last=False) == 0


def test_the_last_short_batch_counts_only_the_samples_it_holds() -> None:
    # 5 indices per rank, batch size 2: the third batch holds 1, the pass consumes 5 per rank.
    assert consumed_samples(start=0, batches=3, batch_size=2, shard_len=5, world_size=2) == 10


def test_bad_arguments_are_refused_with_the_allowed_range() -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        shard([1, 2, 3], rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        remaining_stream([1], consumed=0, world_size=0)
    with pytest.raises(ValueError, match="consumed must be >= 0"):
        remaining_stream([1], consumed=-1, world_size=1)
