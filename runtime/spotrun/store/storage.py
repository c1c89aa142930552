"""fsspec glue for checkpoint storage: filesystems, hashed streaming writes, raw reads.

Any fsspec URL works (gs://, s3://, file://, memory://). Small records are written whole
(by rename on local disks), so a reader sees all of one or nothing; local files are fsynced
only with SPOTRUN_FSYNC=1 (see `fsync_enabled`). Reading a checkpoint's files back goes
through trust.py, which checks them; the reads here are of records that trust.py and
manifest.py parse.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

_CHUNK = 8 << 20


def fsync_enabled() -> bool:
    """Whether local writes are fsynced before a shard counts as written (SPOTRUN_FSYNC=1).

    Off by default: every load verifies sha256, so a shard torn by an OS crash is caught and
    the previous checkpoint is used; a preemption kills processes, not the page cache. Turn
    it on for local disks that must survive an OS crash with the newest checkpoint intact.
    """
    return os.environ.get("SPOTRUN_FSYNC", "0") == "1"


class CorruptFileError(IOError):
    """A stored file's size or sha256 differs from its record: never unpickle it.

    Raised by the checks in trust.py, which is where stored bytes are verified."""


def fsspec_options(url: str) -> dict[str, Any]:
    """Extra filesystem options for `url` (an emulator's anonymous token)."""
    if url.startswith(("gs://", "gcs://")) and os.environ.get("STORAGE_EMULATOR_HOST"):
        # gcsfs probes for zonal/HNS buckets at import time; against an emulator every call
        # would wait for that probe to time out.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        return {"token": "anon"}
    return {}


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for `url`."""
    fs, path = fsspec.core.url_to_fs(url, **fsspec_options(url))
    return fs, path


def is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


# A file's recorded sha256 is taken over CHUNK_BYTES pieces: the sha256 of the pieces'
# sha256 digests, in order (see `chunked_sha256`). The pieces hash on every core at once,
# while a save writes and when a load verifies; a record without chunkBytes holds the
# plain sha256 of the whole file.
CHUNK_BYTES = 16 << 20
# Smaller writes are hashed inline: handing them to a thread costs more than it saves.
_PARALLEL_BYTES = 1 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(2, min(16, os.cpu_count() or 2))
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spotrun-sha256")
        return _pool


def _done(value: bytes | None) -> Future[bytes | None]:
    future: Future[bytes | None] = Future()
    future.set_result(value)
    return future


def _piece_digest(view: memoryview) -> bytes:
    return hashlib.sha256(view).digest()


def chunked_sha256(data: bytes | bytearray | memoryview | mmap.mmap, chunk_bytes: int) -> str:
    """The sha256 of `data`'s chunk_bytes pieces' sha256 digests; the pieces hash in parallel.

    chunk_bytes 0 means the plain sha256 of the whole of `data`. The same value, for a file,
    in plain Python: `sha256(b"".join(sha256(p).digest() for p in pieces)).hexdigest()`.
    """
    view = memoryview(data).cast("B")
    try:
        if not chunk_bytes:
            return hashlib.sha256(view).hexdigest()
        pieces = [view[at : at + chunk_bytes] for at in range(0, view.nbytes, chunk_bytes)]
        try:
            if len(pieces) > 1:
                digests = list(_hash_pool().map(_piece_digest, pieces))
            else:
                digests = [_piece_digest(piece) for piece in pieces]
        finally:
            for piece in pieces:
                piece.release()
        return hashlib.sha256(b"".join(digests)).hexdigest()
    finally:
        view.release()


class ChunkHasher:
    """`chunked_sha256` of a stream, fed in order by `start`; whole pieces hash in parallel."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self.size = 0
        self._digests: list[Future[bytes | None]] = []
        self._partial = hashlib.sha256()
        self._partial_bytes = 0

    def start(self, data: bytes | bytearray | memoryview) -> list[Future[bytes | None]]:
        """Starts hashing the stream's next bytes. The caller must keep `data` unchanged, and
        call `start` again only once every future returned here is done."""
        view = memoryview(data).cast("B")
        parallel = view.nbytes >= _PARALLEL_BYTES
        pool = _hash_pool() if parallel else None
        started: list[Future[bytes | None]] = []

        def run(fn: Any, *args: Any) -> Future[bytes | None]:
            future = pool.submit(fn, *args) if pool is not None else _done(fn(*args))
            started.append(future)
            return future

        at = 0
        if self._partial_bytes:  # complete the piece an earlier write began
            take = min(view.nbytes, self.chunk_bytes - self._partial_bytes)
            self._partial_bytes += take
            closes = self._partial_bytes == self.chunk_bytes
            future = run(_fill, self._partial, view[:take], closes)
            if closes:
                self._digests.append(future)
                self._partial, self._partial_bytes = hashlib.sha256(), 0
            at = take
        while view.nbytes - at >= self.chunk_bytes:  # whole pieces
            self._digests.append(run(_piece_digest, view[at : at + self.chunk_bytes]))
            at += self.chunk_bytes
        if at < view.nbytes:  # the start of the next piece
            self._partial_bytes = view.nbytes - at
            run(_fill, self._partial, view[at:], False)
        self.size += view.nbytes
        return started

    def hexdigest(self) -> str:
        digests = [future.result() for future in self._digests]
        if self._partial_bytes:
            digests.append(self._partial.digest())
        return hashlib.sha256(b"".join(d for d in digests if d is not None)).hexdigest()


def _fill(hasher: Any, view: memoryview, closes: bool) -> bytes | None:
    hasher.update(view)
    return hasher.digest() if closes else None


class HashingWriter:
    """A write-only file object that counts and hashes what passes through it.

    A large write is hashed on helper threads while the calling thread writes it; the call
    returns once both are done, so the caller's buffer is never read after it returns.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._hasher = ChunkHasher()

    @property
    def size(self) -> int:
        return self._hasher.size

    @property
    def chunk_bytes(self) -> int:
        return self._hasher.chunk_bytes

    def write(self, data: bytes | bytearray | memoryview) -> int:
        started = self._hasher.start(data)
        try:
            self._raw.write(data)
        finally:
            for future in started:
                future.result()
        return memoryview(data).nbytes

    def flush(self) -> None:
        self._raw.flush()

    @property
    def sha256(self) -> str:
        return self._hasher.hexdigest()


@dataclass(frozen=True)
class Written:
    size: int
    sha256: str
    chunk_bytes: int = CHUNK_BYTES


@contextmanager
def open_hashed_write(url: str) -> Iterator[HashingWriter]:
    """Streams a file to `url` while hashing it; on exit the bytes are durable."""
    fs, path = filesystem(url)
    if is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        with open(path, "wb", buffering=_CHUNK) as raw:
            writer = HashingWriter(raw)
            yield writer
            raw.flush()
            if fsync_enabled():
                os.fsync(raw.fileno())
        return
    with fs.open(path, "wb", block_size=64 << 20) as raw:
        yield HashingWriter(raw)


def write_bytes(url: str, data: bytes) -> None:
    """Writes a small record whole: readers see either nothing or all of it."""
    fs, path = filesystem(url)
    if is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as raw:
            raw.write(data)
            raw.flush()
            if fsync_enabled():
                os.fsync(raw.fileno())
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    data: bytes = fs.cat_file(path)
    return data


def local_path(url: str) -> str | None:
    """The local file path behind `url`, or None for remote storage."""
    fs, path = filesystem(url)
    return str(path) if is_local(fs) else None


def hash_file(url: str) -> Written:
    """Size and chunked sha256 of a file already in storage, read once in 8 MiB pieces.

    A fallback: DCP files are hashed as they are written (sharded.save)."""
    fs, path = filesystem(url)
    hasher = ChunkHasher()
    with fs.open(path, "rb", **({} if is_local(fs) else {"cache_type": "none"})) as raw:
        while chunk := raw.read(_CHUNK):
            for future in hasher.start(chunk):
                future.result()
    return Written(size=hasher.size, sha256=hasher.hexdigest(), chunk_bytes=hasher.chunk_bytes)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def list_names(url: str) -> list[str]:
    """Base names directly under `url`; an absent folder lists as empty."""
    fs, path = filesystem(url)
    try:
        entries = (
            fs.ls(path, detail=False, refresh=True)
            if not is_local(fs)
            else fs.ls(path, detail=False)
        )
    except FileNotFoundError:
        return []
    return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries})


def remove_tree(url: str) -> None:
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)
    invalidate = getattr(fs, "invalidate_cache", None)
    if callable(invalidate):
        invalidate(path)


# --- versioned records: read-modify-write without a lock -------------------------------------


class VersionConflict(Exception):
    """The object changed (or appeared) since it was read: read it again and retry."""


def supports_versions(url: str) -> bool:
    """Whether `url`'s storage can refuse a write to an object that changed since it was read.

    Google Cloud Storage can (generation preconditions); local files are locked instead.
    """
    fs, _ = filesystem(url)
    return _is_gcs(fs)


def read_versioned(url: str) -> tuple[bytes | None, int]:
    """An object's bytes and its version (0 and None when it does not exist), in one request."""
    fs, path = filesystem(url)
    if not _is_gcs(fs):
        raise NotImplementedError(f"{url}: no object versions on this storage")
    bucket, key, _ = fs.split_path(path)
    try:
        headers, data = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
    except FileNotFoundError:
        return None, 0
    generation = headers.get("x-goog-generation") or headers.get("X-Goog-Generation")
    if generation is None:
        raise OSError(f"{url}: the storage answered without the object's generation")
    return bytes(data), int(generation)


def write_versioned(url: str, data: bytes, version: int) -> None:
    """Writes `data` only if the object is still at `version` (0: only if it does not exist).

    Raises VersionConflict when another writer got there first.
    """
    fs, path = filesystem(url)
    if not _is_gcs(fs):
        raise NotImplementedError(f"{url}: no object versions on this storage")
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call(
            "POST",
            f"{fs._location}/upload/storage/v1/b/{{}}/o",
            bucket,
            uploadType="media",
            name=key,
            ifGenerationMatch=str(version),
            headers={"Content-Type": "application/json"},
            data=data,
            json_out=True,
        )
    except FileExistsError:  # gcsfs's name for HTTP 412 Precondition Failed
        raise VersionConflict(f"{url} changed since version {version}") from None
    fs.invalidate_cache(path)


def _is_gcs(fs: Any) -> bool:
    return type(fs).__name__ in ("GCSFileSystem", "ExtendedGcsFileSystem")
