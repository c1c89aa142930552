"""`Checkpoint`: what training code hands to `report()` and gets back from `get_checkpoint()`.

Modelled on Ray Train's Checkpoint. One built by the user holds a dict, a local directory or
a sharded (DCP) state dict; one returned by `get_checkpoint()` points at a committed
checkpoint whose files were verified before anything is unpickled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from spotrun.store import layout, trust
from spotrun.store.commit import (
    CheckpointCorruptError,
    CheckpointStore,
    Verified,
    load_shard,
    split_uri,
)
from spotrun.store.tree import unflatten


@dataclass
class _Committed:
    store: CheckpointStore
    verified: Verified
    rank: int
    world_size: int
    weights_only: bool = True


class Checkpoint:
    """A checkpoint: in memory (from_dict), on local disk (from_directory), or committed."""

    def __init__(
        self,
        *,
        data: Mapping[str, Any] | None = None,
        directory: str | None = None,
        sharded: Mapping[str, Any] | None = None,
        committed: _Committed | None = None,
    ) -> None:
        if sum(x is not None for x in (data, directory, sharded, committed)) != 1:
            raise ValueError(
                "a Checkpoint holds exactly one of: a dict, a directory, a sharded state dict"
            )
        self._data = data
        self._directory = directory
        self._sharded = sharded
        self._committed = committed
        # A dict served from a peer's or this process's memory: where and what it is.
        self._origin: tuple[str | None, int, dict[str, Any]] | None = None

    @classmethod
    def served_from_memory(
        cls, data: Mapping[str, Any], *, uri: str | None, step: int, metrics: Mapping[str, Any]
    ) -> Checkpoint:
        """The state of checkpoint `uri` (step `step`) as kept in memory by the group; `uri`
        is None for a step kept only in memory (a snapshot between checkpoints)."""
        checkpoint = cls(data=data)
        checkpoint._origin = (uri, step, dict(metrics))
        return checkpoint

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        if not isinstance(data, Mapping):
            raise TypeError(f"Checkpoint.from_dict expects a mapping, got {type(data).__name__}")
        return cls(data=data)

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str]) -> Checkpoint:
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise NotADirectoryError(f"Checkpoint.from_directory: {path!r} is not a directory")
        return cls(directory=path)

    @classmethod
    def from_sharded_state_dict(cls, state_dict: Mapping[str, Any]) -> Checkpoint:
        """Sharded state (FSDP, DTensor), saved with torch.distributed.checkpoint by every rank."""
        return cls(sharded=state_dict)

    @classmethod
    def from_uri(cls, uri: str, *, rank: int = 0, weights_only: bool = True) -> Checkpoint:
        """Opens a committed checkpoint (…/ckpt-NNNNNN) outside training, verifying every file.

        Raises CheckpointCorruptError when the manifest or a file fails its check. For
        per-rank checkpoints, `rank` picks whose state `to_dict()` returns.
        """
        root, seq = split_uri(uri)
        store = CheckpointStore(root)
        verified = store.verify(seq, keep_for=rank)
        world = verified.manifest.world_size
        return cls(committed=_Committed(store, verified, rank, world, weights_only))

    # --- what a committed checkpoint says about itself ----------------------------------

    @property
    def uri(self) -> str | None:
        if self._origin is not None:
            return self._origin[0]
        return self._committed.verified.uri if self._committed else None

    @property
    def step(self) -> int | None:
        if self._origin is not None:
            return self._origin[1]
        return self._committed.verified.manifest.step if self._committed else None

    @property
    def metrics(self) -> dict[str, Any]:
        if self._origin is not None:
            return dict(self._origin[2])
        return dict(self._committed.verified.manifest.metrics) if self._committed else {}

    @property
    def kind(self) -> str:
        if self._committed:
            return self._committed.verified.manifest.kind
        if self._data is not None:
            return "dict"
        return "directory" if self._directory is not None else "dcp"

    # --- conversions ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        if self._data is not None:
            return dict(self._data)
        if self._committed is None:
            raise TypeError(
                f"this checkpoint holds a {self.kind}; to_dict() reads dict checkpoints "
                "(use to_directory() or load_sharded_state_dict())"
            )
        kind = self._committed.verified.manifest.kind
        if kind == "replicated":
            return dict(self._load_replicated())
        if kind == "per-rank":
            return dict(self._load_per_rank())
        raise TypeError(
            f"{self.uri} holds a {kind} checkpoint; read it with "
            + ("to_directory()" if kind == "directory" else "load_sharded_state_dict()")
        )

    def to_directory(self, path: str | os.PathLike[str] | None = None) -> str:
        target = os.fspath(path) if path is not None else tempfile.mkdtemp(prefix="spotrun-ckpt-")
        os.makedirs(target, exist_ok=True)
        if self._directory is not None:
            shutil.copytree(self._directory, target, dirs_exist_ok=True)
            return target
        if self._committed is None or self._committed.verified.manifest.kind != "directory":
            raise TypeError(
                f"this checkpoint holds a {self.kind}; to_directory() reads directory checkpoints"
            )
        committed = self._committed
        try:
            members = {
                record.path: trust.directory_member(record.path)
                for record in committed.verified.manifest.files
            }
            for rel in set(members.values()):
                trust.path_inside(target, rel)
        except trust.UnsafeCheckpointError as err:
            raise CheckpointCorruptError(f"{self.uri}: {err}") from None
        blobs = self._blobs(None)
        written: set[str] = set()
        try:
            for record in sorted(committed.verified.manifest.files, key=lambda f: (f.rank, f.path)):
                rel = members[record.path]
                if rel in written:  # several ranks wrote this name: the lowest rank's copy wins
                    continue
                written.add(rel)
                try:  # checked again as it is written: resolves inside target, links included
                    dest = trust.path_inside(target, rel)
                except trust.UnsafeCheckpointError as err:
                    raise CheckpointCorruptError(f"{self.uri}: {err}") from None
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(blobs[record.path], dest)
        finally:
            committed.verified.release(blobs)
        return target

    @contextmanager
    def as_directory(self) -> Iterator[str]:
        if self._directory is not None:
            yield self._directory
            return
        path = self.to_directory()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def load_sharded_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a DCP checkpoint into `state_dict` in place, resharding to this world size.

        Each rank fetches and verifies only the files its share needs; DCP's metadata is
        read through a restricted unpickler (see store/trust.py)."""
        if self._committed is None or self._committed.verified.manifest.kind != "dcp":
            raise TypeError(f"this checkpoint holds a {self.kind}, not a sharded (dcp) checkpoint")
        from spotrun.store import sharded

        committed = self._committed
        sharded.load(
            committed.store, committed.verified, state_dict, weights_only=committed.weights_only
        )

    # --- loading -------------------------------------------------------------------------

    def _blobs(self, ranks: set[int] | None) -> dict[str, str]:
        """Verified local paths of the files of `ranks` (all when None), fetching (and, for
        remote storage, staging) those not verified yet."""
        assert self._committed is not None
        committed = self._committed
        verified = committed.verified
        wanted = [f for f in verified.manifest.files if ranks is None or f.rank in ranks]
        missing = [f for f in wanted if f.path not in verified.blobs]
        if missing:
            verified.blobs.update(committed.store.fetch(verified, missing))
        return {f.path: verified.blobs[f.path] for f in wanted}

    def _load_replicated(self) -> Any:
        assert self._committed is not None
        blobs = self._blobs(None)
        verified = self._committed.verified
        try:
            shards = [
                load_shard(verified, path, weights_only=self._committed.weights_only)
                for path in blobs
            ]
        finally:
            verified.release(blobs)  # the files are now (memory-mapped) tensors
        skeleton = next((s["skeleton"] for s in shards if "skeleton" in s), None)
        if skeleton is None:
            raise ValueError(f"{self.uri}: no shard carries the checkpoint's structure")
        tensors: dict[int, Any] = {}
        for shard in shards:
            tensors.update(shard["tensors"])
        return unflatten(skeleton, tensors.__getitem__)

    def _load_per_rank(self) -> Any:
        assert self._committed is not None
        manifest = self._committed.verified.manifest
        if manifest.world_size != self._committed.world_size:
            raise ValueError(
                f"{self.uri} kept per-rank state for {manifest.world_size} ranks but this group has "
                f"{self._committed.world_size}: resume with the same world size, or save replicated "
                "or sharded (DCP) state to change it"
            )
        rank = self._committed.rank
        blobs = self._blobs({rank})
        verified = self._committed.verified
        try:
            shard = load_shard(
                verified, layout.shard_name(rank), weights_only=self._committed.weights_only
            )
        finally:
            verified.release(blobs)
        return unflatten(shard["skeleton"], shard["tensors"].__getitem__)

    def __repr__(self) -> str:
        if self._committed:
            return f"Checkpoint(uri={self.uri!r}, step={self.step})"
        return f"Checkpoint({self.kind})"
