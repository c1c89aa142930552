"""fsspec glue for checkpoint storage: filesystems, hashed streaming writes, verified reads.

Any fsspec URL works (gs://, s3://, file://, memory://). Small records are written whole
(by rename on local disks), so a reader sees all of one or nothing; local files are fsynced
only with SPOTRUN_FSYNC=1 (see `fsync_enabled`).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
    """A stored file's size or sha256 differs from its record: never unpickle it."""


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


# Writes at least this large are hashed on a helper thread while they are written: hashlib
# and file writes both release the GIL, so with a spare core sha256 costs no time.
_OVERLAP_BYTES = 4 << 20
_hasher: ThreadPoolExecutor | None = None
_hasher_lock = threading.Lock()


def _hash_thread() -> ThreadPoolExecutor:
    global _hasher
    with _hasher_lock:
        if _hasher is None:
            _hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spotrun-sha256")
        return _hasher


class HashingWriter:
    """A write-only file object that counts and hashes what passes through it.

    A large write is hashed on a helper thread while the calling thread writes it; the call
    returns once both are done, so the caller's buffer is never read after it returns and
    the updates stay in order.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = memoryview(data).nbytes
        if size >= _OVERLAP_BYTES:
            hashed = _hash_thread().submit(self._hash.update, data)
            try:
                self._raw.write(data)
            finally:
                hashed.result()
        else:
            self._hash.update(data)
            self._raw.write(data)
        self.size += size
        return size

    def flush(self) -> None:
        self._raw.flush()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


@dataclass(frozen=True)
class Written:
    size: int
    sha256: str


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


def read_verified(url: str, size: int, sha256: str) -> bytes:
    """Reads a whole file and checks its size and sha256 before anyone may unpickle it."""
    fs, path = filesystem(url)
    try:
        if is_local(fs):
            with open(path, "rb") as raw:
                data = raw.read()
        else:
            data = fs.cat_file(path)
    except FileNotFoundError:
        raise CorruptFileError(f"{url} is missing") from None
    if len(data) != size:
        raise CorruptFileError(f"{url} has {len(data)} bytes, its record says {size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise CorruptFileError(
            f"{url} fails its sha256 check (got {digest[:12]}…, want {sha256[:12]}…)"
        )
    return data


def local_path(url: str) -> str | None:
    """The local file path behind `url`, or None for remote storage."""
    fs, path = filesystem(url)
    return str(path) if is_local(fs) else None


def verify_local(path: str, size: int, sha256: str) -> None:
    """Checks a local file's size and sha256 through an mmap: no copy, the GIL released."""
    try:
        actual = os.stat(path).st_size
    except FileNotFoundError:
        raise CorruptFileError(f"{path} is missing") from None
    if actual != size:
        raise CorruptFileError(f"{path} has {actual} bytes, its record says {size}")
    digest = hashlib.sha256()
    if size:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with (
            open(path, "rb") as raw,
            mmap.mmap(raw.fileno(), 0, flags=flags, prot=mmap.PROT_READ) as mapped,
        ):
            digest.update(mapped)
    if digest.hexdigest() != sha256:
        raise CorruptFileError(
            f"{path} fails its sha256 check (got {digest.hexdigest()[:12]}…, want {sha256[:12]}…)"
        )


def hash_file(url: str) -> Written:
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as raw:
        while chunk := raw.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return Written(size=size, sha256=digest.hexdigest())


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
