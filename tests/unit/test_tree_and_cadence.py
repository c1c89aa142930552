"""Splitting replicated state between writers, and the checkpoint interval."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from spotrun.store.tree import flatten, partition, unflatten
from spotrun.train.cadence import (
    DEFAULT_MTBF_SECONDS,
    Cadence,
    mtbf_seconds,
    young_daly_interval,
)


def test_flatten_round_trips_nested_state_with_int_keys() -> None:
    optim_like = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    state = {
        "model": OrderedDict(w=torch.zeros(2, 2)),
        "optim": optim_like,
        "epoch": 4,
        "pair": (torch.ones(1), "x"),
    }
    skeleton, tensors = flatten(state)
    assert len(tensors) == 4
    back = unflatten(skeleton, tensors.__getitem__)
    assert isinstance(back["model"], OrderedDict)
    assert back["epoch"] == 4 and back["pair"][1] == "x"
    assert back["optim"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert torch.equal(back["optim"]["state"][0]["exp_avg"], torch.ones(2))


@pytest.mark.parametrize(
    ("sizes", "writers", "expected"),
    [
        ([100, 100], [0, 1], {0: [0], 1: [1]}),
        ([300, 100, 100, 100], [0, 1], {0: [0], 1: [1, 2, 3]}),
        ([5, 5, 5], [0], {0: [0, 1, 2]}),
        ([1, 2, 3], [0, 2], {0: [2], 2: [0, 1]}),
        ([], [0, 1], {0: [], 1: []}),
    ],
)
def test_partition_balances_bytes_deterministically(
    sizes: list[int], writers: list[int], expected: dict[int, list[int]]
) -> None:
    parts = partition(sizes, writers)
    assert parts == expected
    assert sorted(i for ix in parts.values() for i in ix) == list(range(len(sizes)))


def test_partition_needs_a_writer() -> None:
    with pytest.raises(ValueError):
        partition([1], [])


def test_young_daly_interval_grows_with_cost_and_mtbf() -> None:
    assert young_daly_interval(2.0, 3600.0) == pytest.approx(120.0)
    assert young_daly_interval(8.0, 3600.0) == pytest.approx(240.0)
    assert young_daly_interval(0.0, 3600.0) == 1.0  # floor
    with pytest.raises(ValueError):
        young_daly_interval(1.0, 0.0)


def test_cadence_is_due_first_then_every_interval() -> None:
    cadence = Cadence(mtbf_seconds=50.0)
    assert cadence.due(0.0)
    cadence.observe(1.0, now=0.0)  # interval sqrt(2*1*50) = 10s
    assert not cadence.due(9.9)
    assert cadence.due(10.0)


def test_the_memory_tiers_cadence_has_its_own_floor_and_counts_from_a_reset() -> None:
    # A snapshot kept in memory costs a copy: with 2 ms and preemptions every 10 s it is
    # due every 0.2 s, below the bucket's 1 s floor but not below its own.
    memory = Cadence(mtbf_seconds=10.0, floor_seconds=0.1)
    memory.observe(0.002, now=0.0)
    assert memory.interval() == pytest.approx(0.2)
    assert Cadence(mtbf_seconds=10.0, cost_seconds=0.002).interval() == 1.0
    assert Cadence(mtbf_seconds=1.0, cost_seconds=0.0001, floor_seconds=0.1).interval() == 0.1
    # A checkpoint to the bucket holds the step in memory too: the interval restarts there,
    # and the measured cost stays the memory copy's.
    memory.reset(5.0)
    assert not memory.due(5.1) and memory.due(5.2)
    assert memory.cost_seconds == 0.002


def test_the_users_mtbf_wins_over_the_observed_one_which_wins_over_the_prior() -> None:
    user, observed = "SPOTRUN_MTBF_SECONDS", "SPOTRUN_OBSERVED_MTBF_SECONDS"
    assert mtbf_seconds({}) == (DEFAULT_MTBF_SECONDS, "the default: no interruption yet")
    assert mtbf_seconds({observed: "42.5"}) == (42.5, "observed: status.group.mtbfSeconds")
    assert mtbf_seconds({user: "600", observed: "42.5"}) == (600.0, user)
    # The observed value is the ledger's: one that is no positive number is ignored.
    for bad in ("", "0", "-3", "nan", "inf", "soon"):
        assert mtbf_seconds({observed: bad})[0] == DEFAULT_MTBF_SECONDS
    # The user's own must be usable, and the error says what it is for.
    with pytest.raises(ValueError, match="SPOTRUN_MTBF_SECONDS must be a positive number"):
        mtbf_seconds({user: "an hour"})
    with pytest.raises(ValueError, match="got '-5'"):
        mtbf_seconds({user: "-5"})
