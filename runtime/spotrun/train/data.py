"""prepare_data_loader: a distributed sampler whose position survives a preemption.

A DDP job restarted from a checkpoint taken mid-epoch must neither repeat nor skip the
samples it had already trained on, or a resumed run drifts from an uninterrupted one.
DistributedSampler has no position. Here the loader wrapper counts the batches the
training loop actually received (not the indices the sampler handed out: DataLoader
workers prefetch ahead of the loop), the session stores that position in every
checkpoint, and on resume the first pass of the saved epoch starts where it stopped.

The position is recorded in global samples, not per-rank batches, so a group resumed at
another world size still sees every remaining sample of the epoch. The index math is
pure (`epoch_order`, `remaining_stream`, `rank_indices`) and mirrors DistributedSampler
exactly when nothing was consumed: same permutation for (seed, epoch), same padding.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from spotrun.train.group import get_device
from spotrun.train.session import get_session

STATEFUL_PREFIX = "data_loader/"


# --- pure index math ------------------------------------------------------------------


def epoch_order(dataset_len: int, *, epoch: int, seed: int = 0, shuffle: bool = True) -> list[int]:
    """The global order of sample indices in `epoch`, before padding and sharding.

    Shuffled with a generator seeded by `seed + epoch`, exactly as DistributedSampler,
    so every rank computes the same order without communicating.
    """
    if not shuffle:
        return list(range(dataset_len))
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    order: list[int] = torch.randperm(dataset_len, generator=generator).tolist()
    return order


def remaining_stream(
    order: Sequence[int], *, consumed: int, world_size: int, drop_last: bool = False
) -> list[int]:
    """The global stream still to be served after the first `consumed` samples of `order`.

    Its length is a multiple of `world_size`: without `drop_last` it is padded with
    samples from the start of the epoch's order (DistributedSampler's padding), with it
    the tail that does not divide evenly is dropped. For `consumed` a multiple of
    `world_size` (ranks advance in lock step) this is exactly the tail of the stream of
    an uninterrupted epoch at the same world size.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if consumed < 0:
        raise ValueError(f"consumed must be >= 0, got {consumed}")
    left = len(order) - consumed
    if left <= 0:
        return []
    if drop_last:
        return list(order[consumed : consumed + (left // world_size) * world_size])
    stream = list(order[consumed:])
    padding = -left % world_size
    stream.extend(itertools.islice(itertools.cycle(order), padding))
    return stream


def shard(stream: Sequence[int], *, rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s share of `stream`: every `world_size`-th sample from position `rank`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(stream[rank::world_size])


def rank_indices(
    dataset_len: int,
    *,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    consumed: int = 0,
) -> list[int]:
    """The sample indices `rank` sees in `epoch` once `consumed` global samples were trained on."""
    order = epoch_order(dataset_len, epoch=epoch, seed=seed, shuffle=shuffle)
    stream = remaining_stream(order, consumed=consumed, world_size=world_size, drop_last=drop_last)
    return shard(stream, rank=rank, world_size=world_size)


def shard_length(dataset_len: int, *, world_size: int, consumed: int, drop_last: bool) -> int:
    """len(rank_indices(...)) without building the permutation."""
    left = dataset_len - consumed
    if left <= 0:
        return 0
    if drop_last:
        return left // world_size
    return math.ceil(left / world_size)


def consumed_samples(
    *, start: int, batches: int, batch_size: int, shard_len: int, world_size: int
) -> int:
    """Global samples consumed after every rank received `batches` batches of a pass.

    `start` is where the pass began (non-zero only for the first pass after a resume);
    `shard_len` is each rank's number of indices in the pass (the last batch may be short).
    """
    return start + min(batches * batch_size, shard_len) * world_size


# --- the sampler and the loader wrapper -----------------------------------------------


class ResumableDistributedSampler(Sampler[int]):
    """DistributedSampler that can start a pass after the samples already consumed.

    It holds no count of its own: DataLoader workers prefetch from it, so what it handed
    out is not what was trained on. `ResumableDataLoader` sets `start` before each pass.
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        rank: int,
        world_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation, like DistributedSampler.set_epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(
            rank_indices(
                self.dataset_len,
                rank=self.rank,
                world_size=self.world_size,
                epoch=self.epoch,
                seed=self.seed,
                shuffle=self.shuffle,
                drop_last=self.drop_last,
                consumed=self.start,
            )
        )

    def __len__(self) -> int:
        return shard_length(
            self.dataset_len,
            world_size=self.world_size,
            consumed=self.start,
            drop_last=self.drop_last,
        )


@dataclass
class _Position:
    """Where the training loop stands in one epoch, in the units stored in checkpoints."""

    epoch: int
    batches: int = 0
    samples: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches, "samples": self.samples}


@dataclass
class _Pass:
    """One iteration over the loader, from where it started to the batches received so far."""

    start: _Position
    shard_len: int
    batches: int = 0


class ResumableDataLoader:
    """A DataLoader over this rank's shard whose position is part of every checkpoint.

    Iterate it like the DataLoader it wraps. The position (`state_dict`) advances when a
    batch reaches the training loop, so a checkpoint reported while training on batch k
    records k batches consumed; call `report()` after the step that used the batch.
    After `load_state_dict`, the next pass over the saved epoch skips what was consumed;
    `set_epoch` to another epoch drops that and starts the new epoch from its beginning.
    """

    def __init__(
        self,
        loader: DataLoader[Any],
        *,
        rank: int,
        world_size: int,
        seed: int = 0,
        move_to_device: bool = True,
    ) -> None:
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "prepare_data_loader needs a map-style dataset (with __len__ and "
                "__getitem__) to shard and resume it; an IterableDataset must shard "
                "itself: use get_context().world_rank and world_size in its __iter__"
            )
        if loader.batch_size is None:
            raise TypeError(
                "prepare_data_loader needs a DataLoader built with batch_size; a custom "
                "batch_sampler cannot be sharded by spotrun: shard it yourself"
            )
        dataset_len = len(dataset)  # type: ignore[arg-type]
        shuffle, drop_last_samples, seed = _sampling_of(loader.sampler, dataset_len, seed)
        self.sampler = ResumableDistributedSampler(
            dataset_len,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last_samples,
        )
        self.batch_size: int = loader.batch_size
        self.drop_last: bool = loader.drop_last
        self.world_size = world_size
        self.loader: DataLoader[Any] = DataLoader(
            dataset,
            batch_size=loader.batch_size,
            sampler=self.sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,
            prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
            pin_memory_device=loader.pin_memory_device,
            in_order=loader.in_order,
        )
        device = get_device()
        self._device: torch.device | None = (
            device if move_to_device and device.type != "cpu" else None
        )
        self._pending: _Position | None = None
        self._pass: _Pass | None = None

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def epoch(self) -> int:
        """The epoch the next pass iterates (restored by `load_state_dict`)."""
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle, like DistributedSampler.set_epoch."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches in a full epoch for this rank (a resumed first pass yields fewer)."""
        per_rank = shard_length(
            self.sampler.dataset_len,
            world_size=self.world_size,
            consumed=0,
            drop_last=self.sampler.drop_last,
        )
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.sampler.epoch
        pending, self._pending = self._pending, None
        start = pending if pending is not None and pending.epoch == epoch else _Position(epoch)
        self.sampler.start = start.samples
        current = _Pass(start=start, shard_len=len(self.sampler))
        self._pass = current
        for batch in self.loader:
            # Counted when handed to the loop, never when prefetched: this is the position.
            current.batches += 1
            yield batch if self._device is None else _to_device(batch, self._device)
        if self._pass is current:
            # A finished pass leaves no position: the next pass starts at its beginning.
            self._pass = None

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "batches", "samples"}: the same on every rank, JSON-serialisable.

        `batches` counts this epoch's batches per rank (including those before a resume);
        `samples` counts the epoch's samples consumed by the whole group and is what a
        resume uses, so it stays right when the world size changes.
        """
        epoch = self.sampler.epoch
        if self._pending is not None and self._pending.epoch == epoch:
            return self._pending.as_dict()
        current = self._pass
        if current is None or current.start.epoch != epoch:
            return _Position(epoch).as_dict()
        return _Position(
            epoch=epoch,
            batches=current.start.batches + current.batches,
            samples=consumed_samples(
                start=current.start.samples,
                batches=current.batches,
                batch_size=self.batch_size,
                shard_len=current.shard_len,
                world_size=self.world_size,
            ),
        ).as_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved position: the next pass over its epoch skips what was consumed."""
        try:
            epoch = int(state["epoch"])
            batches = int(state.get("batches", 0))
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"data loader state must hold integer 'epoch' and 'batches', got {dict(state)!r}"
            ) from None
        # Older positions carry only per-rank batches: assume the group did not change.
        samples = int(state.get("samples", batches * self.batch_size * self.world_size))
        if batches < 0 or samples < 0:
            raise ValueError(f"data loader state must not be negative, got {dict(state)!r}")
        self._pending = _Position(epoch=epoch, batches=batches, samples=samples)
        self._pass = None
        self.sampler.set_epoch(epoch)


def prepare_data_loader(
    loader: DataLoader[Any], *, seed: int = 0, move_to_device: bool = True
) -> ResumableDataLoader:
    """Ray Train's prepare_data_loader, with a position that is saved in every checkpoint.

    Rebuilds `loader` over this rank's shard (batch_size, collate_fn, num_workers,
    drop_last, pin_memory and the rest kept; shuffle becomes the sampler's shuffle with
    `seed` + epoch) and registers it with the session as "data_loader/<n>", n counting
    the loaders this process prepared, so a resumed run restores each one's position.
    With `move_to_device`, batches are moved to this worker's GPU when it has one.
    """
    session = get_session()
    context = session.context
    wrapped = ResumableDataLoader(
        loader,
        rank=context.world_rank,
        world_size=context.world_size,
        seed=seed,
        move_to_device=move_to_device,
    )
    # Numbered per session, not per process: after a warm recovery the training runs again
    # in the same process, and its first loader must find the first loader's position.
    name = f"{STATEFUL_PREFIX}{session.stateful_count(STATEFUL_PREFIX)}"
    session.register_stateful(name, wrapped)
    return wrapped


def _sampling_of(sampler: Any, dataset_len: int, seed: int) -> tuple[bool, bool, int]:
    """(shuffle, drop_last on samples, seed) that the rebuilt sampler keeps from `sampler`."""
    if isinstance(sampler, SequentialSampler):
        return False, False, seed
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler.num_samples != dataset_len:
            raise TypeError(
                "prepare_data_loader cannot shard a RandomSampler with replacement or "
                "num_samples; use shuffle=True without them, or shard the data yourself"
            )
        return True, False, seed
    if isinstance(sampler, DistributedSampler):
        return sampler.shuffle, sampler.drop_last, sampler.seed
    raise TypeError(
        f"prepare_data_loader replaces the loader's sampler with a distributed one and "
        f"cannot keep a {type(sampler).__name__}; build the DataLoader with shuffle=True "
        "or shuffle=False, or shard the data yourself and skip prepare_data_loader"
    )


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(value, device) for value in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch
