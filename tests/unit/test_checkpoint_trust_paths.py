"""The path rules of store/trust.py: a record path names a file inside its checkpoint, and a
directory checkpoint's file lands inside the target, whatever a forged manifest says."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotrun.store import trust
from spotrun.store.manifest import DoneRecord, FileRecord, ManifestError

SHA = "a" * 64

REFUSED = [
    "rank-00000//abs/path",  # the example: joins to /abs/path
    "/abs/path",
    "../x",
    "rank-00000/../x",
    "a/../../x",
    "a//b",
    "a/./b",
    "./a",
    ".",
    "..",
    "a/",
    "",
    "a\0b",
]


@pytest.mark.parametrize("path", REFUSED)
def test_record_paths_outside_or_unnormalised_are_refused(path: str) -> None:
    with pytest.raises(trust.UnsafeCheckpointError):
        trust.check_record_path(path)
    with pytest.raises(ManifestError):
        FileRecord.from_json({"rank": 0, "path": path, "size": 1, "sha256": SHA})


def test_a_done_record_with_an_unsafe_path_is_refused() -> None:
    good = DoneRecord(0, (FileRecord(0, "rank-00000/a", 1, SHA),)).to_bytes()
    with pytest.raises(ManifestError, match="normalised"):
        DoneRecord.from_bytes(good.replace(b"rank-00000/a", b"rank-00000//etc/x"))


@pytest.mark.parametrize(
    "path", ["rank-00000.pt", "dcp/.metadata", "rank-00001/a/b c/d.bin", "a\\b"]
)
def test_ordinary_record_paths_pass(path: str) -> None:
    assert trust.check_record_path(path) == path


def test_record_fields_other_than_paths_are_checked_too() -> None:
    base = {"rank": 0, "path": "rank-00000.pt", "size": 1, "sha256": SHA}
    for bad in (
        {"size": -1},
        {"sha256": "A" * 64},
        {"sha256": "a" * 63},
        {"path": 7},
        {"chunkBytes": 1},  # a load would hash it byte by byte
        {"chunkBytes": 1 << 40},
    ):
        with pytest.raises(ManifestError):
            FileRecord.from_json({**base, **bad})


def test_directory_members_must_sit_under_a_rank_folder() -> None:
    assert trust.directory_member("rank-00003/a/b") == "a/b"
    for path in ("rank-3/a", "other/a", "rank-00000", "rank-00000.pt"):
        with pytest.raises(trust.UnsafeCheckpointError):
            trust.directory_member(path)


def test_path_inside_refuses_a_link_planted_in_the_target(tmp_path: Path) -> None:
    target, outside = tmp_path / "target", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    (target / "sub").symlink_to(outside)
    with pytest.raises(trust.UnsafeCheckpointError, match="outside"):
        trust.path_inside(str(target), "sub/file")
    assert trust.path_inside(str(target), "ok/file") == str(target.resolve() / "ok" / "file")


segments = st.sampled_from(["a", "b", ".", "..", "", "\\", "..\\..", "\0", "rank-00000", " "])


@settings(max_examples=400, deadline=None)
@given(st.lists(segments, min_size=1, max_size=6), st.booleans())
def test_every_accepted_path_is_normalised_and_resolves_inside_the_target(
    parts: list[str], absolute: bool
) -> None:
    path = ("/" if absolute else "") + "/".join(parts)
    target = "/srv/spotrun-target"
    try:
        trust.check_record_path(path)
    except trust.UnsafeCheckpointError:
        # Refused: it was absolute, had an empty, '.' or '..' segment, or a NUL.
        assert absolute or "\0" in path or any(p in ("", ".", "..") for p in path.split("/"))
        return
    assert posixpath.normpath(path) == path and not path.startswith("/")
    dest = trust.path_inside(target, path)
    assert os.path.commonpath([target, dest]) == target and dest != target
