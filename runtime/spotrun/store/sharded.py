"""Sharded state (FSDP, DTensor) through torch.distributed.checkpoint, under the commit rule.

DCP writes the files (one per rank plus `.metadata`) into `<checkpoint>/dcp/` through
fsspec, each hashed while it is written, so recording a rank's files in its `.done` reads
nothing back; rank 0 commits the manifest as for any other checkpoint. DCP's own metadata
lets a checkpoint saved by N ranks load onto M.

Loading does not use DCP's file reader: that one plain-pickles `.metadata` (a forged one
runs code) and unpickles non-tensor values with weights_only=False. `VerifiedReader` reads
`.metadata` through trust.py's restricted unpickler and checks it against the manifest, and
each rank fetches, verifies and reads only the files its load plan needs.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from spotrun.store import layout, storage, trust
from spotrun.store.commit import CheckpointCorruptError, CheckpointStore, Verified
from spotrun.store.manifest import FileRecord

try:
    from torch.distributed.checkpoint import fsspec_filesystem as _fsspec
except ImportError:  # torch < 2.6
    from torch.distributed.checkpoint import (  # type: ignore[no-redef, unused-ignore]
        _fsspec_filesystem as _fsspec,
    )

# DCP's fsspec filesystem and writer, extended below to hash as they write.
_FsspecFileSystem: Any = getattr(_fsspec, "_FileSystem", None) or _fsspec.FileSystem  # type: ignore[attr-defined, unused-ignore]
_FsspecWriter: Any = _fsspec.FsspecWriter

DCP_DIR = "dcp"
METADATA = ".metadata"


# --- saving ------------------------------------------------------------------------------


class _HashingStream(storage.HashingWriter):
    """What DCP writes a file through: counts and hashes every byte on its way out.

    DCP writes each file front to back (tell() for offsets, write, flush, fileno for
    fsync); anything that would move back would break the hash, so seeking is refused.
    """

    def __init__(self, raw: Any) -> None:
        super().__init__(raw)
        self._stream = raw

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return int(self._stream.fileno())

    def close(self) -> None:
        self._stream.close()

    @property
    def closed(self) -> bool:
        return bool(self._stream.closed)


class _HashingFileSystem(_FsspecFileSystem):  # type: ignore[misc]
    """DCP's fsspec filesystem, recording each written file's size and chunked sha256."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, storage.Written] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            out = _HashingStream(raw)
            yield out
        self.written[_basename(path)] = storage.Written(out.size, out.sha256, out.chunk_bytes)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        super().rename(path, new_path)
        record = self.written.pop(_basename(path), None)
        if record is not None:
            self.written[_basename(new_path)] = record


def _basename(path: str | os.PathLike[str]) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


class _HashingWriter(_FsspecWriter):  # type: ignore[misc]
    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(path, single_file_per_rank=True, **kwargs)
        self.fs = _HashingFileSystem()
        self.path = self.fs.init_path(path, **kwargs)


def save(
    checkpoint_uri: str, state_dict: Mapping[str, Any], rank: int
) -> dict[str, storage.Written]:
    """Saves with DCP (a collective); returns what rank wrote, by path relative to the
    checkpoint, with the size and hash taken as it was written (its `.done` entries)."""
    url = layout.join(checkpoint_uri, DCP_DIR)
    writer = _HashingWriter(url, **storage.fsspec_options(url))
    dcp_save(dict(state_dict), storage_writer=writer)
    if dist.is_initialized():
        dist.barrier()  # every rank's files exist before rank 0 commits
    written = writer.fs.written
    missing = [n for n in written if not (n.startswith(f"__{rank}_") or n == METADATA)]
    if missing:
        raise RuntimeError(f"DCP wrote files spotrun does not expect on rank {rank}: {missing}")
    return {f"{DCP_DIR}/{name}": record for name, record in sorted(written.items())}


# --- loading -----------------------------------------------------------------------------


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values unpickle with weights_only=True."""

    def __init__(self, weights_only: bool) -> None:
        super().__init__()
        self._weights_only = weights_only

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = trust.load_torch_stream(value, weights_only=self._weights_only)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class VerifiedReader(StorageReader):
    """A DCP StorageReader over a committed checkpoint: each file it reads is the verified
    local copy (trust.verified_copy) of a file the manifest lists, fetched when the load
    plan first needs it and deleted once read. `.metadata` goes through trust.py's
    restricted unpickler and is checked against the manifest before DCP plans with it."""

    def __init__(
        self, verified: Verified, fetch: Callable[[list[FileRecord]], dict[str, str]]
    ) -> None:
        super().__init__()
        self.verified = verified
        self._fetch = fetch
        prefix = f"{DCP_DIR}/"
        self.records = {
            f.path[len(prefix) :]: f for f in verified.manifest.files if f.path.startswith(prefix)
        }
        self.metadata: Metadata | None = None
        self.refused: CheckpointCorruptError | None = None

    def _local(self, names: list[str]) -> dict[str, str]:
        """Verified local paths of DCP files, fetching those not verified yet."""
        full = {name: f"{DCP_DIR}/{name}" for name in names}
        missing = [self.records[n] for n, p in full.items() if p not in self.verified.blobs]
        try:
            if missing:
                self.verified.blobs.update(self._fetch(missing))
        except CheckpointCorruptError as err:
            self.refused = err
            raise
        return {name: self.verified.blobs[path] for name, path in full.items()}

    def _refuse(self, why: str) -> CheckpointCorruptError:
        self.refused = CheckpointCorruptError(f"{self.verified.uri}: {why}")
        return self.refused

    # StorageReader. read_metadata takes no rank: spotrun never writes rank-local metadata,
    # and without **kwargs DCP does not go looking for it when this one refuses.

    def read_metadata(self) -> Metadata:
        if self.metadata is None:
            if METADATA not in self.records:
                raise self._refuse("the manifest lists no dcp/.metadata")
            path = self._local([METADATA])[METADATA]
            sizes = {name: r.size for name, r in self.records.items() if "/" not in name}
            try:
                self.metadata = trust.load_dcp_metadata(path, sizes)
            except trust.UnsafeCheckpointError as err:
                raise self._refuse(str(err)) from None
            finally:
                self.verified.release([f"{DCP_DIR}/{METADATA}"])
            if self.metadata.storage_meta is None:
                self.metadata.storage_meta = StorageMeta()
        return self.metadata

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        assert self.metadata is not None
        storage_data = self.metadata.storage_data
        per_file: dict[str, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            per_file[storage_data[item.storage_index].relative_path].append(item)
        names = sorted(per_file)
        # The next file is fetched (and verified) while this one is read.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spotrun-dcp") as pool:
            ahead = pool.submit(self._local, names[:1])
            for at, name in enumerate(names):
                local = ahead.result()[name]
                ahead = pool.submit(self._local, names[at + 1 : at + 2])
                try:
                    with open(local, "rb") as raw:
                        items = sorted(
                            per_file[name], key=lambda i: storage_data[i.storage_index].offset
                        )
                        for item in items:
                            info = storage_data[item.storage_index]
                            self._read_item(
                                planner, item, name, trust.FileSlice(raw, info.offset, info.length)
                            )
                finally:
                    self.verified.release([f"{DCP_DIR}/{name}"])
            ahead.result()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_item(self, planner: LoadPlanner, item: ReadItem, name: str, piece: Any) -> None:
        from torch.distributed._shard._utils import narrow_tensor_by_index

        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(piece.read()))
            return
        tensor = trust.load_torch_stream(piece, weights_only=True)
        if not isinstance(tensor, torch.Tensor):
            raise self._refuse(f"{item.storage_index.fqn} in {name} is not a tensor")
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise self._refuse(
                f"{item.storage_index.fqn} has shape {tuple(tensor.size())} in {name}, "
                f"the load plan wants {tuple(target.size())}"
            )
        target.copy_(tensor)
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


def load(
    store: CheckpointStore,
    verified: Verified,
    state_dict: dict[str, Any],
    *,
    weights_only: bool = True,
) -> None:
    """Loads a committed DCP checkpoint into `state_dict` in place (a collective).

    Raises CheckpointCorruptError when a file it reads fails its check, the metadata is
    refused, or a piece does not unpickle weights-only (on every rank: DCP gathers each
    rank's failure).
    """

    def fetch(records: list[FileRecord]) -> dict[str, str]:
        return store.fetch(verified, records)

    reader = VerifiedReader(verified, fetch)
    try:
        dcp_load(state_dict, storage_reader=reader, planner=_WeightsOnlyPlanner(weights_only))
    except BaseException as err:
        if reader.refused is not None:
            raise reader.refused from None
        cause = _first_cause(err)
        if isinstance(cause, CheckpointCorruptError):
            raise CheckpointCorruptError(str(cause)) from None
        if isinstance(cause, pickle.UnpicklingError):
            raise CheckpointCorruptError(
                f"{verified.uri}: a DCP piece does not load weights-only (refusing to run "
                f"what it asks for): {cause}"
            ) from None
        raise
    finally:
        verified.release([p for p in list(verified.blobs) if p.startswith(f"{DCP_DIR}/")])


def _first_cause(err: BaseException) -> BaseException:
    """The first rank's error inside DCP's CheckpointException (failures: rank -> (error,
    stack)), else `err` itself."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, Mapping):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) and failure else failure
            if isinstance(inner, BaseException):
                return inner
    return err
