"""`spotrun status`: a local job's status, printed as `kubectl get trainjobs` prints it.

Local mode keeps each job as the API server would: the TrainJob beside its status
(`<storage>/<namespace>/<job>/trainjob.yaml` and `status.json`). This command reads them
back and prints the CRD's printer columns with kubectl's formatting (ages as `5m12s`,
missing values as `<none>`), or the whole object with `-o yaml|json`, so a person moving
from a laptop to a cluster reads the same table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from spotrun.lifecycle import parse_time
from spotrun.local.trainjob import API_VERSION, KIND, TrainJobError, load_trainjob
from spotrun.store import layout, storage

TRAINJOB_FILE = "trainjob.yaml"
NONE = "<none>"

COLUMNS = (
    "NAME",
    "STATE",
    "READY",
    "SIZE",
    "PREEMPTIONS",
    "FAILURES",
    "CHECKPOINT-STEP",
    "CHECKPOINT-AGE",
    "AGE",
)
# `-o wide` adds the priority-1 columns where the CRD declares them, as kubectl does.
WIDE_COLUMNS = (*COLUMNS[:4], "ATTEMPT", "SPARES", *COLUMNS[4:7], "MEMORY-STEP", *COLUMNS[7:])


def human_duration(seconds: float) -> str:
    """kubectl's HumanDuration (k8s.io/apimachinery/pkg/util/duration): 45s, 5m12s, 3h4m, 2d5h."""
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    total = int(seconds)
    if total < 120:
        return f"{total}s"
    minutes = total // 60
    if minutes < 10:
        rest = total % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = total // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


class StatusFileError(ValueError):
    """A job's status.json is not a status; the message names the file and what to do."""


def read_status(url: str) -> dict[str, Any]:
    """A job's status.json (empty when there is none yet), or StatusFileError if garbled."""
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        return {}
    try:
        status = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        detail = (
            f"not JSON: {err.msg} at line {err.lineno}, column {err.colno}"
            if isinstance(err, json.JSONDecodeError)
            else f"not JSON text: {err}"
        )
        raise StatusFileError(_garbled(url, detail)) from None
    if not isinstance(status, dict):
        raise StatusFileError(_garbled(url, f"a JSON {type(status).__name__}, not an object"))
    return status


def _garbled(url: str, detail: str) -> str:
    return (
        f"{url} is garbled ({detail}); it is the job's status (state, attempt, checkpoints): "
        "restore it, or move the job folder aside to run the job afresh"
    )


def job_object(folder: str) -> dict[str, Any]:
    """The TrainJob kept in a job folder, with its status: what `kubectl get -o yaml` shows."""
    path = os.path.join(folder, TRAINJOB_FILE)
    obj: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
        obj = dict(loaded) if isinstance(loaded, Mapping) else {}
    if not obj:
        # A folder written by a plain `spotrun launch`: its name and namespace are the path.
        name = os.path.basename(os.path.normpath(folder))
        namespace = os.path.basename(os.path.dirname(os.path.normpath(folder)))
        obj = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}}
        if namespace:
            obj["metadata"]["namespace"] = namespace
    obj["status"] = read_status(os.path.join(folder, layout.STATUS_FILE))
    return obj


def row(obj: Mapping[str, Any], now: float, *, wide: bool = False) -> list[str]:
    """The printer columns of one TrainJob, as kubectl formats them."""
    status = obj.get("status") or {}
    metadata = obj.get("metadata") or {}
    latest = status.get("latestCheckpoint") or {}
    created = metadata.get("creationTimestamp") or status.get("startTime")
    cells = [
        str(metadata.get("name", NONE)),
        _cell(status.get("state")),
        _cell(status.get("readyReplicas")),
        _cell(status.get("size")),
        _cell(status.get("preemptions")),
        _cell(status.get("failures")),
        _cell(latest.get("step")),
        _age(latest.get("time"), now),
        _age(created, now),
    ]
    if wide:
        cells.insert(7, _cell((status.get("inMemory") or {}).get("step")))
        cells.insert(4, _cell(status.get("attempt")))
        cells.insert(5, _cell(status.get("spares")))
    return cells


def table(rows: Sequence[Sequence[str]], columns: Sequence[str]) -> str:
    """Columns padded with three spaces between them, as kubectl's tabwriter does."""
    widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [columns, *rows]
    ]
    return "\n".join(lines)


def find_folders(path: str | None, storage: str | None) -> list[str]:
    """The job folders PATH names: a job folder, its status.json, a TrainJob file, or all.

    A TrainJob file is looked up under --storage (default: its spec.checkpoint.storage, else
    ./spotrun-runs); with no PATH, every job under that storage is listed.
    """
    if path is None:
        base = storage_path(storage)
        found = glob.glob(os.path.join(base, "*", "*", layout.STATUS_FILE))
        # `<job>.<time>` folders are finished runs set aside by `spotrun run`, not jobs.
        folders = (os.path.dirname(p) for p in found)
        return sorted(f for f in folders if "." not in os.path.basename(f))
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, layout.STATUS_FILE)):
            raise FileNotFoundError(
                f"{path} has no {layout.STATUS_FILE}: expected a job folder such as "
                f"spotrun-runs/default/<job> (or a TrainJob file)"
            )
        return [path]
    if os.path.basename(path) == layout.STATUS_FILE:
        return [os.path.dirname(path) or "."]
    job = load_trainjob(path)
    folder = os.path.join(storage_path(storage or job.checkpoint.storage), job.namespace, job.name)
    if not os.path.exists(os.path.join(folder, layout.STATUS_FILE)):
        raise FileNotFoundError(
            f"no status for TrainJob {job.namespace}/{job.name} in {folder}: it has not run "
            "there yet (`spotrun run FILE`), or pass the --storage it ran with"
        )
    return [folder]


def storage_path(storage: str | None) -> str:
    """A local folder from a storage path or file:// URL (local mode's storage)."""
    chosen = storage or layout.DEFAULT_STORAGE
    if chosen.startswith("file://"):
        return chosen.removeprefix("file://")
    if "://" in chosen:
        raise ValueError(
            f"`spotrun status` reads local storage; {chosen} is remote: read its "
            "<namespace>/<job>/status.json with the storage's own tools"
        )
    return os.path.abspath(chosen)


def _cell(value: Any) -> str:
    return NONE if value is None else str(value)


def _age(timestamp: Any, now: float) -> str:
    if not timestamp:
        return NONE
    try:
        return human_duration(now - parse_time(str(timestamp)))
    except ValueError:
        return NONE


# --- the `spotrun status` subcommand ----------------------------------------------------

HELP = "print a local job's status as `kubectl get trainjobs` would"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `spotrun status`."""
    parser.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help=(
            "a job folder (spotrun-runs/<namespace>/<job>), its status.json, or a TrainJob "
            "file; none: every job under --storage"
        ),
    )
    parser.add_argument(
        "--storage",
        metavar="PATH",
        help="the storage the job ran with (default: the file's spec.checkpoint.storage, else ./spotrun-runs)",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "wide", "yaml", "json"),
        default="table",
        help="table (default), wide (adds ATTEMPT), or the whole object as yaml or json",
    )


def main(args: argparse.Namespace) -> int:
    """Run `spotrun status` from parsed arguments; returns the exit code."""
    try:
        folders = find_folders(args.path, args.storage)
    except (FileNotFoundError, ValueError, TrainJobError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not folders:
        print("No resources found", file=sys.stderr)
        return 0
    try:
        objects = [job_object(folder) for folder in folders]
    except StatusFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.output in ("yaml", "json"):
        document: Any = (
            objects[0]
            if len(objects) == 1
            else {"apiVersion": "v1", "kind": "List", "items": objects}
        )
        if args.output == "json":
            print(json.dumps(document, indent=4))
        else:
            print(yaml.safe_dump(document, sort_keys=False), end="")
        return 0
    wide = args.output == "wide"
    now = time.time()
    rows = [row(obj, now, wide=wide) for obj in objects]
    columns = WIDE_COLUMNS if wide else COLUMNS
    if args.path is None:
        namespaces = [str((o.get("metadata") or {}).get("namespace", NONE)) for o in objects]
        rows = [[ns, *r] for ns, r in zip(namespaces, rows, strict=True)]
        columns = ("NAMESPACE", *columns)
    print(table(rows, columns))
    return 0
