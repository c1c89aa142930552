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

An elastic job with `spec.elastic.batch: global` keeps the batch of the target group when
the group shrinks: every step consumes the next `batch_size x target world size` samples of
the epoch, split between however many ranks there are (`global_rank_batches`). Ranks may
then hold unequal shares, so the loader records this rank's share of the step
(`step_share`) for the gradient weighting of `prepare_model` (spotrun.train.ddp).
"""

from __future__ import annotations

import itertools
import math
import os
import weakref
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

from spotrun import contract
from spotrun.train.group import get_device
from spotrun.train.session import get_session

STATEFUL_PREFIX = "data_loader/"

# SPOTRUN_ELASTIC_BATCH's values (spec.elastic.batch). With "global" the user's batch_size is
# each worker's batch at the target size; "perReplica" (or unset) keeps it per worker.
GLOBAL_BATCH = "global"
PER_REPLICA_BATCH = "perReplica"


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


def global_batch_stream(
    order: Sequence[int], *, target_world_size: int, drop_last: bool = False
) -> list[int]:
    """The epoch's whole stream with a global batch, whatever the current world size.

    It is the stream the loader serves at the target world size: `order` padded with its
    first samples to a multiple of `target_world_size` (or, with the sampler's `drop_last`,
    cut to one), so a resize never changes which samples an epoch holds.
    """
    return remaining_stream(order, consumed=0, world_size=target_world_size, drop_last=drop_last)


def global_batch_windows(
    stream_len: int, *, consumed: int, global_batch: int, world_size: int, drop_last: bool
) -> list[tuple[int, int]]:
    """[begin, end) in the epoch's stream of each step still to come, with a global batch.

    Each step takes the next `global_batch` samples after `consumed`, however many ranks
    share them, so step k's samples do not depend on the world size. The last window may
    be shorter, unless `drop_last` (the DataLoader's) drops it, as it drops each rank's
    short last batch at the target size. A last window with fewer samples than ranks is
    dropped too (it would leave a rank without a batch); that takes a position that is not
    a multiple of the target world size, which spotrun's loader only records if
    spec.replicas changed within the epoch.
    """
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if consumed < 0:
        raise ValueError(f"consumed must be >= 0, got {consumed}")
    windows: list[tuple[int, int]] = []
    for begin in range(consumed, stream_len, global_batch):
        end = min(begin + global_batch, stream_len)
        if end - begin < global_batch and (drop_last or end - begin < world_size):
            break
        windows.append((begin, end))
    return windows


def share_size(window_len: int, *, rank: int, world_size: int) -> int:
    """How many of a step's `window_len` samples `rank` takes: len(window[rank::world_size])."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return len(range(rank, window_len, world_size))


def global_rank_batches(
    dataset_len: int,
    *,
    rank: int,
    world_size: int,
    target_world_size: int,
    batch_size: int,
    epoch: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last_samples: bool = False,
    drop_last: bool = False,
    consumed: int = 0,
) -> list[list[int]]:
    """`rank`'s batches in `epoch` with a global batch, once `consumed` samples were trained on.

    Batch k is rank's share window[rank::world_size] of step k's window of
    `batch_size * target_world_size` samples. At the target world size these are the
    batches `rank_indices` (batched by `batch_size`) gives, sample for sample: there rank
    r's batch k is stream[k * G + r + W * j] for j < batch_size.
    """
    order = epoch_order(dataset_len, epoch=epoch, seed=seed, shuffle=shuffle)
    stream = global_batch_stream(
        order, target_world_size=target_world_size, drop_last=drop_last_samples
    )
    windows = global_batch_windows(
        len(stream),
        consumed=consumed,
        global_batch=batch_size * target_world_size,
        world_size=world_size,
        drop_last=drop_last,
    )
    return [shard(stream[begin:end], rank=rank, world_size=world_size) for begin, end in windows]


# --- the batch mode, from the pod contract --------------------------------------------


def global_batch_target(env: Mapping[str, str] | None = None) -> int | None:
    """The target world size when the batch is global (SPOTRUN_ELASTIC_BATCH=global), else None.

    The target is SPOTRUN_TARGET_REPLICAS (spec.replicas; SPOTRUN_REPLICAS where unset, a
    group at its target) times SPOTRUN_NPROC_PER_NODE.
    """
    env = os.environ if env is None else env
    if not batch_is_global(env):
        return None
    replicas = _positive(env, contract.TARGET_REPLICAS) or _positive(env, contract.REPLICAS) or 1
    return replicas * (_positive(env, contract.NPROC_PER_NODE) or 1)


def batch_is_global(env: Mapping[str, str] | None = None) -> bool:
    """Whether SPOTRUN_ELASTIC_BATCH asks for a global batch; refuses a value it does not know."""
    mode = (os.environ if env is None else env).get(contract.ELASTIC_BATCH, "")
    if mode not in ("", GLOBAL_BATCH, PER_REPLICA_BATCH):
        raise ValueError(
            f"{contract.ELASTIC_BATCH} must be {GLOBAL_BATCH!r} or {PER_REPLICA_BATCH!r}, got "
            f"{mode!r}; it is set from the TrainJob's spec.elastic.batch"
        )
    return mode == GLOBAL_BATCH


def _positive(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "")
    if raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


# --- this rank's share of the step, for the gradient weighting ------------------------


@dataclass(frozen=True)
class StepShare:
    """This rank's share of the step its loader last handed a batch for (global batch only)."""

    samples: int
    """Samples in this rank's batch."""
    step_samples: int
    """Samples in the step, over the whole group."""


_share: StepShare | None = None
# The loader whose batches set the share: the session's first prepared loader (data_loader/0),
# so an evaluation loader prepared after it does not change the weights of training steps.
_share_driver: weakref.ref[ResumableDataLoader] | None = None


def step_share() -> StepShare | None:
    """The share of the latest batch of the session's first loader, if it has a global batch."""
    return _share


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


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's batches with a global batch: its share of each step's window.

    The epoch, the start and the shuffle are `sampler`'s, so `set_epoch` on either selects
    the epoch and `ResumableDataLoader` sets one start for both.
    """

    def __init__(
        self,
        sampler: ResumableDistributedSampler,
        *,
        target_world_size: int,
        batch_size: int,
        drop_last: bool,
    ) -> None:
        self.sampler = sampler
        self.target_world_size = target_world_size
        self.batch_size = batch_size
        self.drop_last = drop_last

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.target_world_size

    def windows(self, consumed: int) -> list[tuple[int, int]]:
        """Each remaining step's [begin, end) in the epoch's stream, after `consumed`."""
        stream_len = self.target_world_size * shard_length(
            self.sampler.dataset_len,
            world_size=self.target_world_size,
            consumed=0,
            drop_last=self.sampler.drop_last,
        )
        return global_batch_windows(
            stream_len,
            consumed=consumed,
            global_batch=self.global_batch,
            world_size=self.sampler.world_size,
            drop_last=self.drop_last,
        )

    def __iter__(self) -> Iterator[list[int]]:
        sampler = self.sampler
        return iter(
            global_rank_batches(
                sampler.dataset_len,
                rank=sampler.rank,
                world_size=sampler.world_size,
                target_world_size=self.target_world_size,
                batch_size=self.batch_size,
                epoch=sampler.epoch,
                seed=sampler.seed,
                shuffle=sampler.shuffle,
                drop_last_samples=sampler.drop_last,
                drop_last=self.drop_last,
                consumed=sampler.start,
            )
        )

    def __len__(self) -> int:
        return len(self.windows(self.sampler.start))


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
    # Global batch only: each step's [begin, end) in the epoch's stream.
    windows: Sequence[tuple[int, int]] = ()
    batches: int = 0


class ResumableDataLoader:
    """A DataLoader over this rank's shard whose position is part of every checkpoint.

    Iterate it like the DataLoader it wraps. The position (`state_dict`) advances when a
    batch reaches the training loop, so a checkpoint reported while training on batch k
    records k batches consumed; call `report()` after the step that used the batch.
    After `load_state_dict`, the next pass over the saved epoch skips what was consumed;
    `set_epoch` to another epoch drops that and starts the new epoch from its beginning.

    With `target_world_size` the batch is global: `batch_size` is each rank's batch at that
    size, and every step serves the next batch_size x target_world_size samples, shared
    between the `world_size` ranks (see `global_rank_batches`).
    """

    def __init__(
        self,
        loader: DataLoader[Any],
        *,
        rank: int,
        world_size: int,
        seed: int = 0,
        move_to_device: bool = True,
        target_world_size: int | None = None,
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
        self.global_batches: GlobalBatchSampler | None = None
        batching: dict[str, Any] = {
            "batch_size": loader.batch_size,
            "sampler": self.sampler,
            "drop_last": loader.drop_last,
        }
        if target_world_size is not None:
            global_batch = loader.batch_size * target_world_size
            if global_batch < world_size:
                raise ValueError(
                    f"a global batch of {global_batch} samples (batch_size {loader.batch_size} "
                    f"x target world size {target_world_size}) cannot give each of "
                    f"{world_size} ranks a sample; the group is larger than its target: "
                    "check spec.replicas, or use spec.elastic.batch perReplica"
                )
            self.global_batches = GlobalBatchSampler(
                self.sampler,
                target_world_size=target_world_size,
                batch_size=loader.batch_size,
                drop_last=loader.drop_last,
            )
            batching = {"batch_sampler": self.global_batches}
        self.loader: DataLoader[Any] = DataLoader(
            dataset,
            **batching,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
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
        if self.global_batches is not None:
            return len(self.global_batches.windows(0))
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
        windows = () if self.global_batches is None else self.global_batches.windows(start.samples)
        current = _Pass(start=start, shard_len=len(self.sampler), windows=windows)
        self._pass = current
        for batch in self.loader:
            if windows and _share_driver is not None and _share_driver() is self:
                begin, end = windows[current.batches]
                self._record_share(end - begin)
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
        if current.windows:
            # A global batch: the group has consumed every window up to this step's.
            end = current.windows[current.batches - 1][1] if current.batches else None
            return _Position(
                epoch=epoch,
                batches=current.start.batches + current.batches,
                samples=current.start.samples if end is None else end,
            ).as_dict()
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
        per_step = (
            self.batch_size * self.world_size
            if self.global_batches is None
            else self.global_batches.global_batch
        )
        samples = int(state.get("samples", batches * per_step))
        if batches < 0 or samples < 0:
            raise ValueError(f"data loader state must not be negative, got {dict(state)!r}")
        self._pending = _Position(epoch=epoch, batches=batches, samples=samples)
        self._pass = None
        self.sampler.set_epoch(epoch)

    def _record_share(self, step_samples: int) -> None:
        global _share
        samples = share_size(step_samples, rank=self.sampler.rank, world_size=self.world_size)
        _share = StepShare(samples=samples, step_samples=step_samples)


def prepare_data_loader(
    loader: DataLoader[Any], *, seed: int = 0, move_to_device: bool = True
) -> ResumableDataLoader:
    """Ray Train's prepare_data_loader, with a position that is saved in every checkpoint.

    Rebuilds `loader` over this rank's shard (batch_size, collate_fn, num_workers,
    drop_last, pin_memory and the rest kept; shuffle becomes the sampler's shuffle with
    `seed` + epoch) and registers it with the session as "data_loader/<n>", n counting
    the loaders this process prepared, so a resumed run restores each one's position.
    With `move_to_device`, batches are moved to this worker's GPU when it has one.

    With SPOTRUN_ELASTIC_BATCH=global (spec.elastic.batch), `batch_size` is each worker's
    batch at the target size (SPOTRUN_TARGET_REPLICAS x SPOTRUN_NPROC_PER_NODE) and the
    global batch stays the same in a smaller group; the session's first loader then records
    each step's share for `prepare_model`'s gradient weighting.
    """
    global _share, _share_driver
    session = get_session()
    context = session.context
    wrapped = ResumableDataLoader(
        loader,
        rank=context.world_rank,
        world_size=context.world_size,
        seed=seed,
        move_to_device=move_to_device,
        target_world_size=global_batch_target(),
    )
    # Numbered per session, not per process: after a warm recovery the training runs again
    # in the same process, and its first loader must find the first loader's position.
    number = session.stateful_count(STATEFUL_PREFIX)
    if number == 0:
        # A new session (a resize runs the training again) starts without a share.
        _share = None
        _share_driver = None if wrapped.global_batches is None else weakref.ref(wrapped)
    session.register_stateful(f"{STATEFUL_PREFIX}{number}", wrapped)
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
