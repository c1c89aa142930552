"""Everything spotrun reads back from checkpoint storage is checked here, and only here.

A checkpoint is untrusted input. Whoever can write to the bucket can rewrite a shard, the
manifest's digests and the manifest's own checksum together, so a matching sha256 proves
only that a file is the one the manifest names, not that spotrun wrote it. Reading such a
checkpoint must therefore never run code and never write outside the folder it is asked to
write into, whatever the bytes say:

- paths: a file record's path is a normalised relative path (`check_record_path`, applied
  to every record of every manifest and `.done` as it is parsed); a directory checkpoint's
  files land only inside the target (`directory_member`, `path_inside`); local staging
  files are named by us, never after a record;
- sizes and digests: a file is read only up to its recorded size and hashed as it is read
  (`verified_copy`); a remote file is streamed into a private temporary file while it is
  hashed, so what is loaded is exactly what was verified and the bytes are not kept in
  memory;
- unpickling: shards load with `torch.load(weights_only=True)` (`load_torch`); DCP's
  `.metadata`, a plain pickle in torch, loads through an unpickler that knows only DCP's
  metadata classes (`load_dcp_metadata`), and its contents are checked against the
  manifest before DCP sees them (`check_dcp_metadata`): every piece it points at must be
  inside a file the manifest lists, with no stream transforms.

The manifest's own checksum (manifest.py) guards against truncation and stray edits, not
against an attacker, and is not relied on here. This module imports torch only inside the
functions that need it: the supervisor, which reads manifests but never tensors, stays
without it.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import pickle
import posixpath
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Mapping
from concurrent.futures import Future
from contextlib import suppress
from typing import IO, Any, Protocol

from spotrun.store import storage
from spotrun.store.storage import CorruptFileError

# Remote files are read in pieces of this size: two in memory at a time per file (one
# being hashed while the next downloads).
_READ_BYTES = 8 << 20


class UnsafeCheckpointError(ValueError):
    """A checkpoint asks for something it may not: a path outside its folder, a class the
    restricted unpickler does not know, metadata pointing outside the manifest's files."""


class Recorded(Protocol):
    """What a file record says about a file (manifest.FileRecord)."""

    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def sha256(self) -> str: ...
    @property
    def chunk_bytes(self) -> int: ...


# --- paths -------------------------------------------------------------------------------

_DIRECTORY_MEMBER = re.compile(r"^rank-\d{5}/(.+)$")


def check_record_path(path: object) -> str:
    """`path` if it is a normalised relative path inside the checkpoint folder, else raises.

    Refused: anything not a non-empty string, a leading `/`, empty segments (`a//b`, a
    trailing `/`), `.` and `..` segments, NUL. On POSIX a backslash is an ordinary name
    character (it stays one file name, inside the folder), so it is allowed.
    """
    if not isinstance(path, str) or not path:
        raise UnsafeCheckpointError(f"file record path {path!r} is not a non-empty string")
    if "\0" in path:
        raise UnsafeCheckpointError(f"file record path {path!r} contains NUL")
    if path.startswith("/"):
        raise UnsafeCheckpointError(f"file record path {path!r} is absolute")
    segments = path.split("/")
    if any(s in ("", ".", "..") for s in segments) or posixpath.normpath(path) != path:
        raise UnsafeCheckpointError(
            f"file record path {path!r} is not a normalised relative path "
            "(empty, '.' or '..' segments)"
        )
    return path


def directory_member(path: str) -> str:
    """The path inside the directory of a `directory` checkpoint's record `rank-RRRRR/<rel>`."""
    match = _DIRECTORY_MEMBER.match(check_record_path(path))
    if match is None:
        raise UnsafeCheckpointError(
            f"directory checkpoint file {path!r} is not under a rank-RRRRR/ folder"
        )
    return match.group(1)


def path_inside(target: str, rel: str) -> str:
    """The local path of `rel` under `target`; raises unless it resolves inside `target`.

    Resolves symbolic links already on disk, so a link planted in the target cannot lead a
    write out of it either.
    """
    check_record_path(rel)
    root = os.path.realpath(target)
    dest = os.path.realpath(os.path.join(root, *rel.split("/")))
    if os.path.commonpath([root, dest]) != root or dest == root:
        raise UnsafeCheckpointError(f"{rel!r} resolves to {dest}, outside {root}")
    return dest


# --- bytes -------------------------------------------------------------------------------


def check_chunk_bytes(chunk_bytes: int) -> int:
    """A record's chunkBytes: 0 (a plain sha256) or a piece size spotrun could have written.

    Bounded below so a forged record cannot make a load hash one byte at a time."""
    if chunk_bytes and not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise UnsafeCheckpointError(
            f"chunkBytes {chunk_bytes} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}"
        )
    return chunk_bytes


MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 1 << 30


def _mismatch(where: str, digest: str, record: Recorded) -> CorruptFileError:
    return CorruptFileError(
        f"{where} fails its sha256 check (got {digest[:12]}…, want {record.sha256[:12]}…)"
    )


def verify_local(path: str, record: Recorded) -> None:
    """Checks a local file in place: its size, then its sha256 through an mmap (no copy,
    the GIL released, the pieces of a chunked record hashed on every core)."""
    try:
        actual = os.stat(path).st_size
    except FileNotFoundError:
        raise CorruptFileError(f"{path} is missing") from None
    if actual != record.size:
        raise CorruptFileError(f"{path} has {actual} bytes, its record says {record.size}")
    if record.size:
        with (
            open(path, "rb") as raw,
            mmap.mmap(raw.fileno(), 0, prot=mmap.PROT_READ) as mapped,
        ):
            digest = storage.chunked_sha256(mapped, record.chunk_bytes)
    else:
        digest = storage.chunked_sha256(b"", record.chunk_bytes)
    if digest != record.sha256:
        raise _mismatch(path, digest, record)


class Staging:
    """A private temporary folder for verified copies of remote files; removed with it.

    Files in it are named by a counter, never after a record. Set SPOTRUN_LOAD_DIR to put
    it somewhere other than the system temporary folder (a remote load needs as much free
    space as the files it reads at once; each is deleted once loaded).
    """

    def __init__(self) -> None:
        self._dir: str | None = None
        self._count = 0
        self._lock = threading.Lock()

    def new_path(self) -> str:
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(
                    prefix="spotrun-load-", dir=os.environ.get("SPOTRUN_LOAD_DIR") or None
                )
                weakref.finalize(self, shutil.rmtree, self._dir, True)
            self._count += 1
            return os.path.join(self._dir, f"{self._count:06d}")

    def owns(self, path: str) -> bool:
        return self._dir is not None and os.path.dirname(path) == self._dir

    def release(self, path: str) -> None:
        """Deletes a staged copy (a mapping of it stays valid until unmapped)."""
        if self.owns(path):
            with suppress(FileNotFoundError):
                os.unlink(path)


class _PlainHasher:
    """The sha256 of a whole stream, with ChunkHasher's interface (a record without
    chunkBytes)."""

    def __init__(self) -> None:
        self.size = 0
        self._hash = hashlib.sha256()

    def start(self, data: bytes) -> list[Future[bytes | None]]:
        self._hash.update(data)
        self.size += len(data)
        return []

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def verified_copy(url: str, record: Recorded, staging: Staging | None) -> str | None:
    """Checks the file at `url` against its record; returns a local path that holds
    exactly the verified bytes, or None where no copy was asked for.

    A local file is checked in place and its own path returned. A remote file is streamed,
    at most record.size + 1 bytes of it, and hashed piece by piece as it arrives: into a
    new file in `staging` (whose path is returned) or, without `staging`, nowhere (only
    checked). Either way at most two pieces of it are in memory. Raises CorruptFileError
    on a missing file or a size or sha256 mismatch; a partial copy is deleted.
    """
    local = storage.local_path(url)
    if local is not None:
        verify_local(local, record)
        return local
    fs, path = storage.filesystem(url)
    dest = staging.new_path() if staging is not None else None
    hasher: storage.ChunkHasher | _PlainHasher = (
        storage.ChunkHasher(record.chunk_bytes) if record.chunk_bytes else _PlainHasher()
    )
    out = open(dest, "wb") if dest is not None else None  # noqa: SIM115 (closed below)
    try:
        try:
            raw = fs.open(path, "rb", cache_type="none")
        except FileNotFoundError:
            raise CorruptFileError(f"{url} is missing") from None
        with raw:
            left = record.size + 1  # one byte past the record tells a longer file
            pending: list[Future[bytes | None]] = []
            while left > 0 and (chunk := raw.read(min(_READ_BYTES, left))):
                for future in pending:  # the previous piece, hashed while this one arrived
                    future.result()
                if hasher.size + len(chunk) > record.size:
                    raise CorruptFileError(
                        f"{url} is longer than the {record.size} bytes its record says"
                    )
                left -= len(chunk)
                pending = hasher.start(chunk)
                if out is not None:
                    out.write(chunk)
            for future in pending:
                future.result()
        if out is not None:
            out.close()
        if hasher.size != record.size:
            raise CorruptFileError(f"{url} has {hasher.size} bytes, its record says {record.size}")
        digest = hasher.hexdigest()
        if digest != record.sha256:
            raise _mismatch(url, digest, record)
    except BaseException:
        if out is not None:
            out.close()
        if dest is not None:
            with suppress(FileNotFoundError):
                os.unlink(dest)
        raise
    return dest


# --- unpickling --------------------------------------------------------------------------


def load_torch(path: str, *, weights_only: bool = True) -> Any:
    """Unpickles a verified shard from a local file, memory-mapped.

    weights_only=True (the default, and what every spotrun load uses) refuses any class
    outside torch's tensor allowlist, so a forged shard cannot run code. Only
    `Checkpoint.from_uri(weights_only=False)`, asked for in so many words, turns it off.
    """
    import torch

    return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)


def load_torch_stream(stream: IO[bytes], *, weights_only: bool = True) -> Any:
    """Unpickles one verified piece of a DCP file (a tensor, or a non-tensor value)."""
    import torch

    return torch.load(stream, map_location="cpu", weights_only=weights_only)


# (module, name) pairs a DCP `.metadata` pickle may name: the dataclasses of
# torch.distributed.checkpoint.metadata and filesystem, torch.Size, dtypes and layouts.
_DCP_METADATA_CLASSES = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        # torch.layout pickles as a call of this lookup by name (torch.strided, …).
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }
)


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata classes and torch dtypes; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch":
            import torch

            # Looked up in the module's own names: getattr could import a lazy submodule.
            value = vars(torch).get(name)
            if isinstance(value, torch.dtype):
                return value
        raise UnsafeCheckpointError(
            f"DCP metadata names {module}.{name}, which is not one of DCP's metadata classes: "
            "refusing to unpickle it"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("DCP metadata holds a persistent id: refusing it")


def load_dcp_metadata(path: str, files: Mapping[str, int]) -> Any:
    """DCP's `.metadata` from a verified local file, unpickled with the allowlist above and
    checked by `check_dcp_metadata` against `files` (DCP file name -> recorded size)."""
    with open(path, "rb") as raw:
        try:
            metadata = _DcpMetadataUnpickler(raw).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # a malformed pickle: any error the unpickler raises
            raise UnsafeCheckpointError(f"DCP metadata does not unpickle: {err}") from None
    check_dcp_metadata(metadata, files)
    return metadata


def check_dcp_metadata(metadata: Any, files: Mapping[str, int]) -> None:
    """Checks the shape of DCP metadata and that every piece it names lies inside one of
    `files` (name -> size, the DCP files the manifest lists), untransformed."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    def refuse(why: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"DCP metadata {why}")

    if not isinstance(metadata, Metadata):
        raise refuse(f"is a {type(metadata).__name__}, not a Metadata")
    if not isinstance(metadata.state_dict_metadata, dict):
        raise refuse("has no state_dict_metadata mapping")
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(
            item, TensorStorageMetadata | BytesStorageMetadata
        ):
            raise refuse(f"entry {key!r} is not tensor or bytes metadata")
    if not isinstance(metadata.storage_data, dict) or not metadata.storage_data:
        raise refuse("has no storage_data mapping")
    for index, info in metadata.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise refuse(f"storage entry {index!r} is not a MetadataIndex -> _StorageInfo")
        name = info.relative_path
        if not isinstance(name, str) or name not in files or name == ".metadata":
            raise refuse(f"points {index.fqn!r} at {name!r}, which the manifest does not list")
        offset, length = info.offset, info.length
        if (
            not isinstance(offset, int)
            or not isinstance(length, int)
            or isinstance(offset, bool)
            or isinstance(length, bool)
            or offset < 0
            or length < 0
            or offset + length > files[name]
        ):
            raise refuse(
                f"points {index.fqn!r} at bytes {offset!r}+{length!r} of {name}, which has "
                f"{files[name]}"
            )
        if info.transform_descriptors:
            raise refuse(f"asks for stream transforms {info.transform_descriptors!r} on {name}")


class FileSlice(io.RawIOBase):
    """A read-only, seekable window [offset, offset + length) onto an open local file."""

    def __init__(self, raw: IO[bytes], offset: int, length: int) -> None:
        super().__init__()
        self._raw, self._start, self._length, self._at = raw, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._length}[whence]
        self._at = max(0, base + offset)
        return self._at

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(view.nbytes, self._length - self._at))
        if not want:
            return 0
        self._raw.seek(self._start + self._at)
        got = self._raw.readinto(view[:want])  # type: ignore[attr-defined]
        self._at += got or 0
        return got or 0
