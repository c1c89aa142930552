"""The global elastic batch's index math: the same samples per step at any world size."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotrun.train.data import (
    global_batch_target,
    global_rank_batches,
    rank_indices,
    share_size,
)


def step_sets(
    dataset_len: int, sizes: list[tuple[int, int]], *, target: int, batch: int, epoch: int = 0
) -> list[set[int]]:
    """The samples of every step of an epoch trained with world size w for n steps, in turn.

    `sizes` is [(world size, steps at it), ...]; the last size runs to the end of the epoch.
    Each rank's batches come from global_rank_batches at the position reached so far.
    """
    steps: list[set[int]] = []
    consumed = 0
    for i, (world, count) in enumerate(sizes):
        per_rank = [
            global_rank_batches(
                dataset_len,
                rank=r,
                world_size=world,
                target_world_size=target,
                batch_size=batch,
                epoch=epoch,
                seed=7,
                consumed=consumed,
            )
            for r in range(world)
        ]
        last = i == len(sizes) - 1
        for k in range(len(per_rank[0]) if last else min(count, len(per_rank[0]))):
            shares = [per_rank[r][k] for r in range(world) if k < len(per_rank[r])]
            step = [sample for share in shares for sample in share]
            consumed += len(step)
            steps.append(set(step))
    return steps


@settings(max_examples=150, deadline=None)
@given(
    steps=st.integers(1, 12),
    target=st.sampled_from([2, 4]),
    batch=st.sampled_from([2, 3, 4]),
    resizes=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 5)), min_size=1, max_size=4),
)
def test_every_sample_once_and_the_same_steps_across_resizes(
    steps: int, target: int, batch: int, resizes: list[tuple[int, int]]
) -> None:
    dataset_len = steps * batch * target  # a whole number of global batches: no padding
    fixed = step_sets(dataset_len, [(target, 0)], target=target, batch=batch)
    resized = step_sets(dataset_len, [*resizes, (target, 0)], target=target, batch=batch)
    assert resized == fixed  # step k holds the same samples whatever the group's size
    seen = [sample for step in resized for sample in step]
    assert sorted(seen) == list(range(dataset_len))  # each sample exactly once


def test_at_the_target_size_the_batches_are_the_fixed_size_loaders() -> None:
    for rank in range(4):
        batches = global_rank_batches(
            64, rank=rank, world_size=4, target_world_size=4, batch_size=4, epoch=3, seed=1
        )
        shard = rank_indices(64, rank=rank, world_size=4, epoch=3, seed=1)
        assert batches == [shard[i : i + 4] for i in range(0, len(shard), 4)]


def test_uneven_shares_differ_by_one_and_cover_the_step() -> None:
    shares = [share_size(16, rank=r, world_size=3) for r in range(3)]
    assert shares == [6, 5, 5]
    batches = [
        global_rank_batches(48, rank=r, world_size=3, target_world_size=4, batch_size=4, epoch=0)
        for r in range(3)
    ]
    assert [len(b[0]) for b in batches] == shares
    assert len({len(b) for b in batches}) == 1  # every rank takes part in every step


def test_the_target_comes_from_the_contract_and_bad_modes_are_refused() -> None:
    env = {
        "SPOTRUN_ELASTIC_BATCH": "global",
        "SPOTRUN_TARGET_REPLICAS": "4",
        "SPOTRUN_REPLICAS": "2",
        "SPOTRUN_NPROC_PER_NODE": "2",
    }
    assert global_batch_target(env) == 8
    assert global_batch_target({**env, "SPOTRUN_ELASTIC_BATCH": "perReplica"}) is None
    assert global_batch_target({}) is None
    with pytest.raises(ValueError, match="SPOTRUN_ELASTIC_BATCH"):
        global_batch_target({**env, "SPOTRUN_ELASTIC_BATCH": "Global"})
