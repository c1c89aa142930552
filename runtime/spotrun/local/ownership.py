"""One `spotrun run` per job folder: the supervisor holds the job's ownership while it runs.

Two supervisors on one job folder would both start groups, write the same checkpoint
numbers and fence each other out of the status. The second is refused, with the owner named.
The ownership must not outlive a crashed owner (a SIGKILLed supervisor leaves no one to
release it), so:

- on local files it is an flock on `<storage>/<namespace>/.<job>.owner`: the kernel
  releases it when the owner's process ends, however it ends;
- on a bucket with object generations (GCS) it is a lease object beside the job folder,
  created only if absent, renewed by its owner every few seconds with a generation
  precondition, and taken over only once it has expired.

Other fsspec storage has neither, so the run goes ahead with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

from spotrun.lifecycle import format_time
from spotrun.store import layout, storage

# How long a lease on a bucket lasts without renewal; the owner renews every third of it.
LEASE_SECONDS = 30.0


class JobOwnedError(RuntimeError):
    """Another supervisor runs this job; the message names it and says what to do."""


@dataclass
class Ownership:
    """This process's hold on one job folder, until `release()`."""

    url: str
    owner: dict[str, Any]
    _file: IO[str] | None = None
    _version: int | None = None
    _renewed: float = 0.0

    def renew(self, now: float | None = None) -> None:
        """Keeps a bucket lease alive; call it often (it writes at most every LEASE_SECONDS/3)."""
        if self._version is None:
            return
        now = time.time() if now is None else now
        if now - self._renewed < LEASE_SECONDS / 3:
            return
        record = {**self.owner, "expires": now + LEASE_SECONDS}
        try:
            storage.write_versioned(self.url, _encode(record), self._version)
        except storage.VersionConflict:
            raise JobOwnedError(
                f"lost the ownership of the job to another supervisor ({self.url} changed): "
                "this run stops; the other one goes on"
            ) from None
        self._version = storage.read_versioned(self.url)[1]
        self._renewed = now

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._version is not None:
            with contextlib.suppress(OSError, storage.VersionConflict):
                expired = {**self.owner, "expires": 0}
                storage.write_versioned(self.url, _encode(expired), self._version)
            self._version = None


def owner_url(root: str) -> str:
    """Where the ownership of the job in `root` is kept: beside the folder, not inside it
    (a finished run's folder is moved aside, and the ownership must not move with it)."""
    parent, _, job = root.rstrip("/").rpartition("/")
    return layout.join(parent, f".{job}.owner")


def acquire(root: str, *, now: float | None = None) -> Ownership:
    """Takes the ownership of the job folder `root`, or raises JobOwnedError naming the owner."""
    now = time.time() if now is None else now
    url = owner_url(root)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": format_time(now),
        "command": " ".join(["spotrun", *sys.argv[1:]]) if sys.argv else "spotrun run",
    }
    fs, path = storage.filesystem(url)
    if storage.is_local(fs):
        return _acquire_local(url, path, me)
    if storage.supports_versions(url):
        return _acquire_lease(url, me, now)
    print(
        f"[spotrun run] warning: {url} cannot be locked on this storage; make sure no other "
        "`spotrun run` runs this job",
        file=sys.stderr,
    )
    return Ownership(url, me)


def _acquire_local(url: str, path: str, me: dict[str, Any]) -> Ownership:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = _decode(handle.read().encode())
        handle.close()
        raise JobOwnedError(_refusal(owner, url)) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(me))
    handle.flush()
    return Ownership(url, me, _file=handle)


def _acquire_lease(url: str, me: dict[str, Any], now: float) -> Ownership:
    data, version = storage.read_versioned(url)
    if data is not None:
        owner = _decode(data)
        expires = float(owner.get("expires") or 0)
        if expires > now:
            raise JobOwnedError(
                _refusal(owner, url)
                + f"; if that run crashed, its lease expires at {format_time(expires)}"
            )
    record = {**me, "expires": now + LEASE_SECONDS}
    try:
        storage.write_versioned(url, _encode(record), version)
    except storage.VersionConflict:
        owner = _decode(storage.read_versioned(url)[0] or b"{}")
        raise JobOwnedError(_refusal(owner, url)) from None
    return Ownership(url, me, _version=storage.read_versioned(url)[1], _renewed=now)


def _refusal(owner: dict[str, Any], url: str) -> str:
    who = (
        f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('since', '?')}"
        if owner
        else "another process"
    )
    command = f" (`{owner['command']}`)" if owner.get("command") else ""
    return (
        f"this job is already being run by {who}{command} (ownership kept in {url}): stop "
        "that run first, or give this one another --storage or job name"
    )


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def _decode(data: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(data or b"{}")
    except json.JSONDecodeError:
        return {}
    return raw if isinstance(raw, dict) else {}
