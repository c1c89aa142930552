"""The checkpoint protocol over storage: write shards, commit them, find and load the latest.

A checkpoint is committed when `manifest.json` exists in its folder, passes its checksum,
and every file it lists has the recorded size and sha256. Anything else in the job folder
(a folder without a manifest, a manifest whose files fail) is not a checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from spotrun.store import layout, storage, trust
from spotrun.store.manifest import Commit, DoneRecord, FileRecord, Manifest, ManifestError

log = logging.getLogger("spotrun.train.checkpoint")


class CheckpointCorruptError(RuntimeError):
    """A committed checkpoint failed verification; nothing of it was unpickled."""


class NoValidCheckpointError(RuntimeError):
    """Asked to resume, but neither the checkpoint nor any earlier one verifies."""


@dataclass
class Verified:
    """A committed checkpoint whose files were checked against its manifest."""

    uri: str
    manifest: Manifest
    manifest_sha256: str
    # Local paths holding verified bytes, by relative path: the file itself (local storage)
    # or a staged copy (remote storage, trust.verified_copy). Never the bytes themselves.
    blobs: dict[str, str] = field(default_factory=dict)
    staging: trust.Staging = field(default_factory=trust.Staging, repr=False)

    def release(self, paths: Iterable[str]) -> None:
        """Forgets verified copies once loaded; staged copies are deleted (an mmap of one
        stays valid until its tensors are freed)."""
        for path in paths:
            local = self.blobs.pop(path, None)
            if local is not None:
                self.staging.release(local)


def loaded_by(manifest: Manifest, rank: int) -> set[str]:
    """The files rank reads when it loads this checkpoint, as far as the manifest tells:
    every file of a replicated or directory checkpoint, its own of a per-rank one, none of a
    DCP one (which files a rank reads depends on its load plan, so DCP stages its own)."""
    if manifest.kind == "per-rank":
        return {f.path for f in manifest.files_of(rank)}
    if manifest.kind == "dcp":
        return set()
    return {f.path for f in manifest.files}


class CheckpointStore:
    """One job's checkpoint folder: `<storage>/<namespace>/<job>/`."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self._manifests: dict[int, tuple[Manifest, str]] = {}

    def uri(self, seq: int) -> str:
        return layout.join(self.root, layout.checkpoint_name(seq))

    def highest_seq(self) -> int | None:
        """The highest `ckpt-*` number present, committed or not (numbers are never reused)."""
        seqs = [
            s
            for s in map(layout.parse_checkpoint_name, storage.list_names(self.root))
            if s is not None
        ]
        return max(seqs, default=None)

    # --- writing -------------------------------------------------------------------------

    def write_torch_shard(self, seq: int, rank: int, obj: Any) -> DoneRecord:
        name = layout.shard_name(rank)
        with storage.open_hashed_write(layout.join(self.uri(seq), name)) as out, _without_zip_crc():
            torch.save(obj, out)  # type: ignore[arg-type]
        record = DoneRecord(
            rank=rank, files=(FileRecord(rank, name, out.size, out.sha256, out.chunk_bytes),)
        )
        self.write_done(seq, record)
        return record

    def write_files(self, seq: int, rank: int, files: Mapping[str, str]) -> DoneRecord:
        """Uploads local files (relative name -> local path) as rank's part of checkpoint seq."""
        records = []
        for rel, local in sorted(files.items()):
            with (
                open(local, "rb") as src,
                storage.open_hashed_write(layout.join(self.uri(seq), rel)) as out,
            ):
                while chunk := src.read(8 << 20):
                    out.write(chunk)
            records.append(FileRecord(rank, rel, out.size, out.sha256, out.chunk_bytes))
        record = DoneRecord(rank=rank, files=tuple(records))
        self.write_done(seq, record)
        return record

    def record_existing(
        self, seq: int, rank: int, paths: Mapping[str, storage.Written] | Iterable[str]
    ) -> DoneRecord:
        """Marks files already in checkpoint seq (written by DCP) as rank's.

        Given a mapping (as sharded.save returns: path -> size and hash taken while the file
        was written), records those; given bare paths, reads each back once to hash it.
        """
        hashed = paths if isinstance(paths, Mapping) else {}
        records = []
        for rel in sorted(paths):
            written = hashed.get(rel) or storage.hash_file(layout.join(self.uri(seq), rel))
            records.append(FileRecord(rank, rel, written.size, written.sha256, written.chunk_bytes))
        record = DoneRecord(rank=rank, files=tuple(records))
        self.write_done(seq, record)
        return record

    def write_done(self, seq: int, record: DoneRecord) -> None:
        storage.write_bytes(
            layout.join(self.uri(seq), layout.done_name(record.rank)), record.to_bytes()
        )

    def read_done(self, seq: int, rank: int) -> DoneRecord | None:
        try:
            return DoneRecord.from_bytes(
                storage.read_bytes(layout.join(self.uri(seq), layout.done_name(rank)))
            )
        except FileNotFoundError:
            return None

    def wait_for_done(self, seq: int, ranks: Iterable[int], timeout: float) -> list[DoneRecord]:
        """Waits until every rank's `.done` exists; a rank that died mid-upload never writes one.

        A local look costs microseconds, so it polls every 10 ms; a bucket look is a request,
        so it backs off from 50 ms to 0.5 s (the commit then lags the last shard by at most that).
        """
        local = storage.local_path(self.root) is not None
        poll, longest = (0.01, 0.01) if local else (0.05, 0.5)
        pending = sorted(set(ranks))
        found: dict[int, DoneRecord] = {}
        deadline = time.monotonic() + timeout
        while True:
            for rank in list(pending):
                record = self.read_done(seq, rank)
                if record is not None:
                    found[rank] = record
                    pending.remove(rank)
            if not pending:
                return [found[r] for r in sorted(found)]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"checkpoint {seq}: ranks {pending} wrote no .done within {timeout:.0f}s; "
                    "it stays uncommitted"
                )
            time.sleep(poll)
            poll = min(poll * 1.5, longest)

    def commit(self, manifest: Manifest) -> Commit:
        data = manifest.to_bytes()
        storage.write_bytes(layout.join(self.uri(manifest.seq), layout.MANIFEST), data)
        sha = hashlib.sha256(data).hexdigest()
        self._manifests[manifest.seq] = (manifest, sha)
        return Commit(uri=self.uri(manifest.seq), manifest=manifest, manifest_sha256=sha)

    def delete(self, seq: int) -> None:
        self._manifests.pop(seq, None)
        storage.remove_tree(self.uri(seq))

    # --- reading -------------------------------------------------------------------------

    def read_manifest(self, seq: int) -> tuple[Manifest, str]:
        """The parsed manifest and its sha256; raises ManifestError or FileNotFoundError."""
        if seq in self._manifests:
            return self._manifests[seq]
        data = storage.read_bytes(layout.join(self.uri(seq), layout.MANIFEST))
        manifest = Manifest.from_bytes(data)
        if manifest.seq != seq:
            raise ManifestError(
                f"manifest in {layout.checkpoint_name(seq)} says seq {manifest.seq}"
            )
        entry = (manifest, hashlib.sha256(data).hexdigest())
        self._manifests[seq] = entry
        return entry

    def committed(self) -> list[Commit]:
        """Every checkpoint with a readable manifest, oldest first (files not yet verified)."""
        out = []
        for name in storage.list_names(self.root):
            seq = layout.parse_checkpoint_name(name)
            if seq is None:
                continue
            try:
                manifest, sha = self.read_manifest(seq)
            except FileNotFoundError:
                continue
            except ManifestError as err:
                log.warning("ignoring %s: %s", self.uri(seq), err)
                continue
            out.append(Commit(uri=self.uri(seq), manifest=manifest, manifest_sha256=sha))
        return sorted(out, key=lambda c: c.manifest.seq)

    def uncommitted(self, below: int) -> list[int]:
        """Checkpoint folders numbered below `below` that hold no manifest (half-written)."""
        out = []
        for name in storage.list_names(self.root):
            seq = layout.parse_checkpoint_name(name)
            if seq is None or seq >= below:
                continue
            if not storage.exists(layout.join(self.uri(seq), layout.MANIFEST)):
                out.append(seq)
        return sorted(out)

    def verify(
        self, seq: int, ranks: Iterable[int] | None = None, *, keep_for: int | None = 0
    ) -> Verified:
        """Checks every file of checkpoint seq (or only those of `ranks`) against its record.

        Local files are checked in place. Remote files are streamed and hashed as they
        arrive; those rank `keep_for` will load (`loaded_by`) are kept as staged local
        copies, the rest not at all.
        """
        try:
            manifest, sha = self.read_manifest(seq)
        except (FileNotFoundError, ManifestError) as err:
            raise CheckpointCorruptError(f"{self.uri(seq)}: {err}") from None
        wanted = set(ranks) if ranks is not None else None
        files = [f for f in manifest.files if wanted is None or f.rank in wanted]
        keep = loaded_by(manifest, keep_for) if keep_for is not None else set()
        verified = Verified(uri=self.uri(seq), manifest=manifest, manifest_sha256=sha)
        verified.blobs.update(self.fetch(verified, files, keep=lambda f: f.path in keep))
        return verified

    def fetch(
        self,
        verified: Verified,
        files: Sequence[FileRecord],
        keep: Callable[[FileRecord], bool] = lambda f: True,
    ) -> dict[str, str]:
        """Verifies `files` of a checkpoint, 8 at a time; returns the verified local path of
        each that is local or was kept (staged into verified.staging). When one fails, the
        copies staged for the others are deleted and CheckpointCorruptError raised."""

        def check(record: FileRecord) -> str | None:
            url = layout.join(verified.uri, record.path)
            return trust.verified_copy(url, record, verified.staging if keep(record) else None)

        with ThreadPoolExecutor(max_workers=max(1, min(8, len(files)))) as pool:
            futures = {record.path: pool.submit(check, record) for record in files}
        out: dict[str, str] = {}
        failure: BaseException | None = None
        for path, future in futures.items():
            try:
                local = future.result()
            except BaseException as err:
                failure = failure or err
                continue
            if local is not None:
                out[path] = local
        if failure is not None:
            for local in out.values():
                verified.staging.release(local)
            if isinstance(failure, storage.CorruptFileError):
                raise CheckpointCorruptError(str(failure)) from None
            raise failure
        return out

    def resolve(self, seq: int, ranks: Iterable[int] | None = None) -> tuple[Verified, list[str]]:
        """Checkpoint seq verified, or the newest earlier committed one that verifies.

        Returns it with the problems met on the way (empty when seq itself was good).
        Never falls back to "no checkpoint": that raises NoValidCheckpointError.
        """
        problems: list[str] = []
        candidates = [seq] + [
            c.manifest.seq for c in reversed(self.committed()) if c.manifest.seq < seq
        ]
        for candidate in candidates:
            try:
                return self.verify(candidate, ranks), problems
            except CheckpointCorruptError as err:
                problems.append(str(err))
                log.error("checkpoint %s is not usable: %s", self.uri(candidate), err)
        raise NoValidCheckpointError(
            f"cannot resume from {self.uri(seq)}: it and every earlier checkpoint in {self.root} "
            f"failed verification ({'; '.join(problems)}). Refusing to restart from step 0; "
            "delete the job's status checkpoint or set spec.resumeFrom to a good checkpoint."
        )


@contextmanager
def _without_zip_crc() -> Iterator[None]:
    """torch.save's per-record CRC32 duplicates the shard's sha256 and halves save speed."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def load_shard(verified: Verified, path: str, *, weights_only: bool = True) -> Any:
    """Unpickles a verified shard (`torch.load(weights_only=True)`, memory-mapped)."""
    try:
        return trust.load_torch(verified.blobs[path], weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise CheckpointCorruptError(
            f"{verified.uri}/{path} verifies but does not load as a weights-only shard "
            f"(refusing to run what it asks for): {err}"
        ) from None


def split_uri(uri: str) -> tuple[str, int]:
    """(job folder, seq) of a checkpoint URI such as gs://b/ns/job/ckpt-000012."""
    root, _, name = uri.rstrip("/").rpartition("/")
    seq = layout.parse_checkpoint_name(name)
    if seq is None or not root:
        raise ValueError(f"{uri!r} is not a checkpoint URI (…/ckpt-NNNNNN)")
    return root, seq
