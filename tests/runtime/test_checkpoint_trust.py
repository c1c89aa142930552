"""A checkpoint is untrusted input: a forged one, whose digests and manifest checksum were
recomputed by whoever forged it, runs no code and writes nothing outside its target; loads
from remote storage stream and verify without keeping the bytes (store/trust.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from spotrun import Checkpoint
from spotrun.store import layout, sharded, storage, trust
from spotrun.store.commit import CheckpointCorruptError, CheckpointStore
from spotrun.store.manifest import CheckpointKind, DoneRecord, build_manifest
from tests.fixtures.gcs import GcsEmulator
from tests.runtime.helpers import PYTHONPATH, WORKLOADS, Job

# --- committing and forging checkpoints ---------------------------------------------------


def commit(store: CheckpointStore, seq: int, kind: CheckpointKind, done: list[DoneRecord]) -> str:
    world = max(d.rank for d in done) + 1
    store.commit(
        build_manifest(
            seq=seq, step=seq, kind=kind, attempt=0, world_size=world, time=0.0, done=done
        )
    )
    return store.uri(seq)


def commit_dcp(root: str, state: dict[str, Any], seq: int = 0) -> str:
    store = CheckpointStore(root)
    written = sharded.save(store.uri(seq), state, rank=0)
    return commit(store, seq, "dcp", [store.record_existing(seq, 0, written)])


def forge_manifest(ckpt: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrites manifest.json as an attacker would: edited, with a valid checksum."""
    body = json.loads((ckpt / layout.MANIFEST).read_text())
    body.pop("checksum")
    edit(body)
    body["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (ckpt / layout.MANIFEST).write_text(json.dumps(body))


def forge_file(ckpt: Path, rel: str, data: bytes) -> None:
    """Replaces a file and its record's size and digest, so every check on the bytes passes."""
    (ckpt / rel).write_bytes(data)

    def edit(body: dict[str, Any]) -> None:
        (record,) = [f for f in body["files"] if f["path"] == rel]
        record["size"] = len(data)
        record["sha256"] = storage.chunked_sha256(data, record.get("chunkBytes", 0))

    forge_manifest(ckpt, edit)


class CreatesFile:
    """A pickle payload: unpickling it creates `path` (as `open(path, "w")`)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class RunsCommand:
    """A pickle payload: unpickling it runs `touch path` in a shell."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def assert_payload_is_live(payload: bytes, marker: Path) -> None:
    """The payload does what it says when unpickled plainly (as torch's DCP reader does)."""
    pickle.loads(payload)
    assert marker.exists(), "the test's payload is not live"
    marker.unlink()


def real_metadata(ckpt: Path) -> Any:
    return pickle.loads((ckpt / "dcp/.metadata").read_bytes())  # our own, trusted file


# --- item 1: a forged DCP checkpoint runs nothing -------------------------------------------


def evil_metadata(kind: str, ckpt: Path, marker: Path) -> bytes:
    if kind == "open":
        return pickle.dumps(CreatesFile(marker))
    if kind == "system":
        return pickle.dumps(RunsCommand(marker))
    metadata = real_metadata(ckpt)  # a real Metadata carrying the payload inside
    metadata.planner_data = {"w": CreatesFile(marker)}
    return pickle.dumps(metadata)


STATE = {"w": torch.arange(12.0).reshape(3, 4), "step": 7, "extra": {"l": [1, "x"]}}


def empty_state() -> dict[str, Any]:
    return {"w": torch.zeros(3, 4), "step": 0, "extra": {"l": None}}


@pytest.mark.parametrize("kind", ["open", "system", "inside-real-metadata"])
def test_forged_dcp_metadata_runs_nothing(tmp_path: Path, kind: str) -> None:
    uri = commit_dcp(str(tmp_path / "runs"), STATE)
    ckpt, marker = Path(uri), tmp_path / "pwned"
    payload = evil_metadata(kind, ckpt, marker)
    assert_payload_is_live(payload, marker)
    forge_file(ckpt, "dcp/.metadata", payload)

    checkpoint = Checkpoint.from_uri(uri)  # every digest matches: the forger recomputed them
    with pytest.raises(CheckpointCorruptError, match="not one of DCP's metadata classes"):
        checkpoint.load_sharded_state_dict(empty_state())
    assert not marker.exists()


def test_a_legitimate_dcp_checkpoint_loads_values_and_tensors(tmp_path: Path) -> None:
    uri = commit_dcp(str(tmp_path / "runs"), STATE)
    state = empty_state()
    Checkpoint.from_uri(uri).load_sharded_state_dict(state)
    assert torch.equal(state["w"], STATE["w"]) and state["step"] == 7
    assert state["extra"] == {"l": [1, "x"]}


def test_a_forged_dcp_value_pickle_runs_nothing(tmp_path: Path) -> None:
    """DCP's own planner unpickles non-tensor values with weights_only=False."""
    uri = commit_dcp(str(tmp_path / "runs"), STATE)
    ckpt, marker = Path(uri), tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(CreatesFile(marker), buf)
    evil = buf.getvalue()
    torch.load(io.BytesIO(evil), weights_only=False)  # live, as DCP's planner would load it
    assert marker.exists()
    marker.unlink()

    metadata = real_metadata(ckpt)
    data = (ckpt / "dcp/__0_0.distcp").read_bytes()
    (index,) = [i for i in metadata.storage_data if i.fqn == "step"]
    info = metadata.storage_data[index]
    info.offset, info.length = len(data), len(evil)
    forge_file(ckpt, "dcp/__0_0.distcp", data + evil)
    forge_file(ckpt, "dcp/.metadata", pickle.dumps(metadata))

    with pytest.raises(CheckpointCorruptError, match="weights-only"):
        Checkpoint.from_uri(uri).load_sharded_state_dict(empty_state())
    assert not marker.exists()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("../../../etc/passwd", "does not list"),
        ("__9_0.distcp", "does not list"),
        (".metadata", "does not list"),
        ("past-the-end", "which has"),
    ],
)
def test_dcp_metadata_pointing_outside_the_manifest_files_is_refused(
    tmp_path: Path, where: str, message: str
) -> None:
    uri = commit_dcp(str(tmp_path / "runs"), STATE)
    ckpt = Path(uri)
    metadata = real_metadata(ckpt)
    info = next(iter(metadata.storage_data.values()))
    if where == "past-the-end":
        info.offset = (ckpt / "dcp/__0_0.distcp").stat().st_size
    else:
        info.relative_path = where
    forge_file(ckpt, "dcp/.metadata", pickle.dumps(metadata))
    with pytest.raises(CheckpointCorruptError, match=message):
        Checkpoint.from_uri(uri).load_sharded_state_dict(empty_state())


def test_forged_dcp_checkpoint_resumed_by_a_group_runs_nothing(tmp_path: Path) -> None:
    """Through the training API: two ranks resume from a forged sharded checkpoint."""
    job = Job(str(tmp_path / "runs"))
    code, out = job.run({"mode": "save"}, nproc=2, workload="sharded_state.py")
    assert code == 0, out
    ckpt, marker = Path(job.latest_uri()), tmp_path / "pwned"
    forge_file(ckpt, "dcp/.metadata", pickle.dumps(RunsCommand(marker)))
    code, out = job.run(
        {"mode": "load"},
        nproc=2,
        attempt=1,
        resume_from=job.latest_uri(),
        workload="sharded_state.py",
    )
    assert code != 0, out
    assert "CheckpointCorruptError" in out and "not one of DCP's metadata classes" in out, out
    assert "restored" not in out
    assert not marker.exists()


def test_each_rank_fetches_only_the_dcp_files_its_load_plan_reads(
    gcs: GcsEmulator, tmp_path: Path
) -> None:
    """Saved by two ranks on the GCS emulator, loaded by two: the weight is sharded by rows,
    so rank 1 needs only its own file; rank 0 also reads rank 1's, where DCP put the one
    copy of the replicated `step` tensor. Each fetched file is verified as it arrives."""
    job = Job(gcs.new_bucket())
    code, out = job.run({"mode": "save"}, nproc=2, workload="sharded_state.py")
    assert code == 0, out
    code, out = job.run(
        {"mode": "load", "trace_reads": True},
        nproc=2,
        attempt=1,
        resume_from=job.latest_uri(),
        workload="sharded_state.py",
    )
    assert code == 0, out
    assert "rank 1 read ['dcp/.metadata', 'dcp/__1_0.distcp']" in out, out
    assert out.count("on world size 2") == 2, out


def test_dcp_files_are_hashed_as_they_are_written(tmp_path: Path, gcs: GcsEmulator) -> None:
    for root in (str(tmp_path / "runs"), f"{gcs.new_bucket()}/ns/job"):
        store = CheckpointStore(root)
        written = sharded.save(store.uri(0), STATE, rank=0)
        assert set(written) == {"dcp/.metadata", "dcp/__0_0.distcp"}
        for rel, record in written.items():
            assert storage.hash_file(layout.join(store.uri(0), rel)) == record, (root, rel)


def test_recording_dcp_files_reads_nothing_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(str(tmp_path / "runs"))
    written = sharded.save(store.uri(0), STATE, rank=0)

    def no_reads(url: str) -> storage.Written:
        raise AssertionError(f"{url} was read back to hash it")

    monkeypatch.setattr(storage, "hash_file", no_reads)
    record = store.record_existing(0, 0, written)
    assert {f.path: f.sha256 for f in record.files} == {p: w.sha256 for p, w in written.items()}


# --- item 2: directory checkpoints write only inside their target --------------------------


def make_tree(root: Path, files: dict[str, str]) -> dict[str, str]:
    """Creates files under root; returns {relative name: local path}."""
    out = {}
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        out[rel] = str(path)
    return out


def commit_directory(root: str, trees: dict[int, dict[str, str]], scratch: Path) -> str:
    store = CheckpointStore(root)
    done = []
    for rank, files in sorted(trees.items()):
        local = make_tree(scratch / f"src-{rank}", files)
        named = {f"{layout.shard_dir_name(rank)}/{rel}": path for rel, path in local.items()}
        done.append(store.write_files(0, rank, named))
    return commit(store, 0, "directory", done)


def read_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


TREES = {
    0: {"shared.txt": "zero", "a/b/c/deep.txt": "deep", "empty": "", "only-0/x": "0" * 5000},
    1: {"shared.txt": "one", "only-1/y": "1", "a/b/other": ""},
    2: {"only-2/z/w": "two"},
}
RESTORED = {
    "shared.txt": "zero",  # the lowest rank's copy wins
    "a/b/c/deep.txt": "deep",
    "empty": "",
    "only-0/x": "0" * 5000,
    "only-1/y": "1",
    "a/b/other": "",
    "only-2/z/w": "two",
}


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_directory_checkpoint_round_trips(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    root = (
        str(tmp_path / "runs")
        if where == "local"
        else f"{request.getfixturevalue('gcs').new_bucket()}/ns/job"
    )
    uri = commit_directory(root, TREES, tmp_path)
    checkpoint = Checkpoint.from_uri(uri)
    assert checkpoint.kind == "directory"
    target = tmp_path / "restored"
    assert checkpoint.to_directory(str(target)) == str(target)
    assert read_tree(target) == RESTORED
    again = Checkpoint.from_uri(uri).to_directory()  # a fresh temporary folder
    assert read_tree(Path(again)) == RESTORED
    with Checkpoint.from_uri(uri).as_directory() as tmp:
        assert read_tree(Path(tmp)) == RESTORED
    assert not os.path.exists(tmp)
    source = Checkpoint.from_directory(tmp_path / "src-0")
    assert read_tree(Path(source.to_directory(str(tmp_path / "copy")))) == TREES[0]


def test_directory_checkpoint_of_several_ranks_restores_through_a_group(tmp_path: Path) -> None:
    job = Job(str(tmp_path / "runs"))
    code, out = job.run({"mode": "save"}, nproc=2, workload="directory_state.py")
    assert code == 0, out
    code, out = job.run(
        {"mode": "load", "out": str(tmp_path / "out"), "saved_world": 2},
        nproc=2,
        attempt=1,
        resume_from=job.latest_uri(),
        workload="directory_state.py",
    )
    assert code == 0, out
    assert out.count("restored 5 files") == 2, out


@pytest.mark.parametrize(
    "forged",
    [
        "rank-00000//{outside}/file",
        "rank-00000/../../../../../../../..{outside}/file",
        "rank-00000/a/../../x",
        "../x",
        "rank-00000/a//b",
        "{outside}/file",
        "rank-00000/a\0b",
    ],
)
def test_forged_directory_paths_are_refused_and_write_nothing(tmp_path: Path, forged: str) -> None:
    outside = tmp_path / "outside"
    uri = commit_directory(str(tmp_path / "runs"), {0: {"file": "payload"}}, tmp_path)
    path = forged.format(outside=outside)

    def edit(body: dict[str, Any]) -> None:
        body["files"][0]["path"] = path

    forge_manifest(Path(uri), edit)
    with pytest.raises(CheckpointCorruptError, match="file record path"):
        Checkpoint.from_uri(uri).to_directory(str(tmp_path / "target"))
    assert not outside.exists()
    assert not (tmp_path / "target").exists()


def test_to_directory_refuses_files_outside_a_rank_folder(tmp_path: Path) -> None:
    uri = commit_directory(str(tmp_path / "runs"), {0: {"file": "payload"}}, tmp_path)
    ckpt = Path(uri)
    (ckpt / "loose").write_text("payload")  # the same bytes, so the record's digest matches

    def edit(body: dict[str, Any]) -> None:
        body["files"][0]["path"] = "loose"

    forge_manifest(ckpt, edit)
    with pytest.raises(CheckpointCorruptError, match="rank-RRRRR"):
        Checkpoint.from_uri(uri).to_directory(str(tmp_path / "target"))


def test_to_directory_does_not_follow_a_link_out_of_the_target(tmp_path: Path) -> None:
    outside, target = tmp_path / "outside", tmp_path / "target"
    outside.mkdir()
    target.mkdir()
    (target / "a").symlink_to(outside)
    uri = commit_directory(str(tmp_path / "runs"), {0: {"a/file": "payload"}}, tmp_path)
    with pytest.raises(CheckpointCorruptError, match="outside"):
        Checkpoint.from_uri(uri).to_directory(str(target))
    assert not any(outside.iterdir())


# --- item 3: remote loads stream and verify without keeping the bytes ---------------------


def commit_replicated(root: str, mb: int, seq: int = 0) -> str:
    """A replicated checkpoint of two shards of mb/2 MiB of float32 each."""
    store = CheckpointStore(root)
    per = mb * (1 << 20) // 8
    done = []
    for rank in (0, 1):
        shard: dict[str, Any] = {
            "kind": "replicated",
            "tensors": {rank: torch.full((per,), float(rank + 1))},
        }
        if rank == 0:
            shard["skeleton"] = {"a": ("__spotrun_tensor__", 0), "b": ("__spotrun_tensor__", 1)}
        done.append(store.write_torch_shard(seq, rank, shard))
    return commit(store, seq, "replicated", done)


def test_remote_load_checks_what_it_loads_and_keeps_no_copy(
    gcs: GcsEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPOTRUN_LOAD_DIR", str(tmp_path / "staging"))
    (tmp_path / "staging").mkdir()
    uri = commit_replicated(f"{gcs.new_bucket()}/ns/job", 2)
    checkpoint = Checkpoint.from_uri(uri)
    assert all(isinstance(p, str) for p in checkpoint._committed.verified.blobs.values())  # type: ignore[union-attr]
    state = checkpoint.to_dict()
    assert float(state["a"][0]) == 1.0 and float(state["b"][-1]) == 2.0
    assert not [p for p in (tmp_path / "staging").rglob("*") if p.is_file()], (
        "staged copies outlive the load"
    )
    assert checkpoint.to_dict()["a"].shape == state["a"].shape  # fetched again when asked again


def test_a_remote_file_longer_than_its_record_is_refused_without_reading_it_all(
    gcs: GcsEmulator,
) -> None:
    import fsspec

    uri = commit_replicated(f"{gcs.new_bucket()}/ns/job", 2)
    fs = fsspec.filesystem("gs", token="anon")
    fs.pipe_file(f"{uri}/rank-00001.pt", b"\0" * (40 << 20))
    fs.invalidate_cache()
    with pytest.raises(CheckpointCorruptError, match="longer than"):
        Checkpoint.from_uri(uri)


def test_remote_load_peak_memory_stays_near_the_state_size(gcs: GcsEmulator) -> None:
    """The peak resident set (VmHWM) of a fresh process loading 256 MiB from the GCS
    emulator, every tensor touched: it held the downloaded bytes and the tensors (2.5x
    measured before the change); now the state and a few pieces in flight (1.16x)."""
    mb = 256
    root = f"{gcs.new_bucket()}/ns/job"
    uri = commit_replicated(root, mb, seq=1)
    warm = commit_replicated(root, 2, seq=0)
    proc = subprocess.run(
        [sys.executable, str(WORKLOADS / "measure_load.py"), uri, warm],
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    result = json.loads(lines[0][7:])
    state = result["state_bytes"]
    assert state == mb << 20
    grew = (result["peak_kb"] - result["baseline_kb"]) * 1024
    assert grew < 1.5 * state, f"a {mb} MiB load grew the peak RSS by {grew / state:.2f}x"


def test_trust_is_the_one_module_that_unpickles_checkpoint_bytes() -> None:
    """No torch.load, pickle load or Unpickler under runtime/spotrun/store or in
    train/checkpoint.py but in store/trust.py."""
    import ast

    root = Path(trust.__file__).parent
    for source in [*root.glob("*.py"), root.parent / "train" / "checkpoint.py"]:
        if source.name == "trust.py":
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert name not in ("torch.load", "pickle.load", "pickle.loads"), (source, name)
            assert not name.endswith("Unpickler"), (source, name)
