"""The commit records of the checkpoint protocol: per-rank `.done` files and `manifest.json`.

Pure data and JSON, no I/O. A checkpoint exists only when its manifest parses, its own
checksum matches, and every file it lists verifies; these types are what that check reads.
Every record path and chunk size parsed here passes trust.py's rules (see there).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from spotrun.lifecycle.times import format_time
from spotrun.store import trust

FORMAT_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

CheckpointKind = Literal["replicated", "per-rank", "directory", "dcp"]
KINDS: tuple[str, ...] = ("replicated", "per-rank", "directory", "dcp")


class ManifestError(ValueError):
    """A `.done` record or a manifest is malformed or fails its own checksum."""


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint, relative to the checkpoint folder, and how to verify it."""

    rank: int
    path: str
    size: int
    sha256: str
    # >0: sha256 is over the file's pieces of this many bytes (storage.chunked_sha256);
    # 0: sha256 is of the whole file.
    chunk_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rank": self.rank,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
        }
        if self.chunk_bytes:
            out["chunkBytes"] = self.chunk_bytes
        return out

    @classmethod
    def from_json(cls, raw: Any) -> FileRecord:
        if not isinstance(raw, Mapping):
            raise ManifestError(f"a file record must be an object, got {type(raw).__name__}")
        try:
            path = raw["path"]
            if not isinstance(path, str):
                raise TypeError("path")
            record = cls(
                rank=int(raw["rank"]),
                path=path,
                size=int(raw["size"]),
                sha256=str(raw["sha256"]),
                chunk_bytes=int(raw.get("chunkBytes", 0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"a file record lacks or mistypes {err}") from None
        if record.size < 0 or not _SHA256.match(record.sha256):
            raise ManifestError(f"file record {record.path!r} has an invalid size or hash")
        try:
            trust.check_record_path(record.path)
            trust.check_chunk_bytes(record.chunk_bytes)
        except trust.UnsafeCheckpointError as err:
            raise ManifestError(str(err)) from None
        return record


@dataclass(frozen=True)
class DoneRecord:
    """What one rank wrote into a checkpoint; it is written only once those files are durable."""

    rank: int
    files: tuple[FileRecord, ...]

    def to_bytes(self) -> bytes:
        body = {"rank": self.rank, "files": [f.to_json() for f in self.files]}
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> DoneRecord:
        try:
            raw = json.loads(data)
            return cls(
                rank=int(raw["rank"]), files=tuple(FileRecord.from_json(f) for f in raw["files"])
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise ManifestError(f"unreadable .done record: {err}") from None


@dataclass(frozen=True)
class Manifest:
    """The commit marker of one checkpoint, written last by rank 0."""

    seq: int
    step: int
    kind: CheckpointKind
    attempt: int
    world_size: int
    time: float
    files: tuple[FileRecord, ...]
    metrics: Mapping[str, Any] = field(default_factory=dict)
    runtime: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def _body(self) -> dict[str, Any]:
        return {
            "formatVersion": self.format_version,
            "seq": self.seq,
            "step": self.step,
            "kind": self.kind,
            "attempt": self.attempt,
            "worldSize": self.world_size,
            "time": self.time,
            "metrics": dict(self.metrics),
            "runtime": dict(self.runtime),
            "files": [f.to_json() for f in sorted(self.files, key=lambda f: (f.rank, f.path))],
        }

    def to_bytes(self) -> bytes:
        body = self._body()
        body["checksum"] = _checksum(body)
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def ranks(self) -> list[int]:
        return sorted({f.rank for f in self.files})

    def files_of(self, rank: int) -> list[FileRecord]:
        return [f for f in self.files if f.rank == rank]

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise ManifestError(f"manifest.json is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ManifestError("manifest.json must hold a JSON object")
        checksum = raw.pop("checksum", None)
        if checksum != _checksum(raw):
            raise ManifestError("manifest.json fails its checksum: it was altered or truncated")
        if raw.get("formatVersion") != FORMAT_VERSION:
            raise ManifestError(
                f"manifest formatVersion {raw.get('formatVersion')!r} is not {FORMAT_VERSION}: "
                "written by another spotrun version"
            )
        kind = raw.get("kind")
        if kind not in KINDS:
            raise ManifestError(f"manifest kind {kind!r} is not one of {', '.join(KINDS)}")
        try:
            manifest = cls(
                seq=int(raw["seq"]),
                step=int(raw["step"]),
                kind=kind,
                attempt=int(raw["attempt"]),
                world_size=int(raw["worldSize"]),
                time=float(raw["time"]),
                files=tuple(FileRecord.from_json(f) for f in raw["files"]),
                metrics=dict(raw.get("metrics") or {}),
                runtime=dict(raw.get("runtime") or {}),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"manifest.json lacks or mistypes {err}") from None
        paths = [f.path for f in manifest.files]
        if len(set(paths)) != len(paths):
            raise ManifestError("manifest.json lists the same file twice")
        return manifest


def build_manifest(
    *,
    seq: int,
    step: int,
    kind: CheckpointKind,
    attempt: int,
    world_size: int,
    time: float,
    done: Sequence[DoneRecord],
    metrics: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
) -> Manifest:
    files = tuple(f for record in sorted(done, key=lambda d: d.rank) for f in record.files)
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        raise ManifestError(f"two ranks wrote the same file in checkpoint {seq}")
    return Manifest(
        seq=seq,
        step=step,
        kind=kind,
        attempt=attempt,
        world_size=world_size,
        time=time,
        files=files,
        metrics=json_metrics(metrics or {}),
        runtime=dict(runtime or {}),
    )


def _checksum(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Commit:
    """One committed checkpoint as the status records it."""

    uri: str
    manifest: Manifest
    manifest_sha256: str

    def entry(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "seq": self.manifest.seq,
            "step": self.manifest.step,
            "attempt": self.manifest.attempt,
            "time": format_time(self.manifest.time),
            "metrics": json_metrics(self.manifest.metrics),
            "manifestSha256": self.manifest_sha256,
        }


def json_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON values: numbers, strings and nested mappings and lists kept (a tensor's
    or numpy scalar's value taken), anything else turned to its repr."""
    return {str(key): _json_value(value) for key, value in metrics.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, Mapping):
        return json_metrics(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _json_value(item())
        except (TypeError, ValueError, RuntimeError):  # a tensor of more than one element
            pass
    return repr(value)
