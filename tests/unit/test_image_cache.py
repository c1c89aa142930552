"""hack/images' cache: the build context as Docker sends it, the content keys, the OCI layout.

A key must change with everything a build reads and with nothing else: otherwise an image
is stale (the node runs old code) or rebuilt for nothing (minutes, for the runtime image).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))
from clusterlib import imagebuild  # noqa: E402
from clusterlib.context import context_files, ignored, parse_dockerignore  # noqa: E402


def test_the_dockerfiles_context_is_what_its_dockerignore_lets_in() -> None:
    files = context_files(ROOT)
    assert {f.split("/")[0] for f in files} == {
        "pyproject.toml",
        "README.md",
        "runtime",
        "operator",
    }
    assert "runtime/spotrun/__init__.py" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or ".egg-info" in f]
    assert context_files(ROOT / "examples") == sorted(
        p.name for p in (ROOT / "examples").glob("*.py")
    )


@pytest.mark.parametrize(
    ("patterns", "path", "left_out"),
    [
        ("*", "README.md", True),
        ("*", "runtime/spotrun/x.py", True),  # through its parent directory
        ("*\n!runtime/", "runtime/spotrun/x.py", False),
        ("*\n!runtime/\n**/__pycache__/", "runtime/spotrun/__pycache__/x.pyc", True),
        ("**/*.py[cod]", "a/b/c.pyc", True),
        ("**/*.py[cod]", "a/b/c.py", False),
        ("docs/*.md", "docs/a/b.md", False),  # `*` does not cross `/`
        ("docs/**/*.md", "docs/a/b.md", True),
        ("docs/**", "docs/a/b.md", True),
        ("/build", "build/x", True),  # a leading slash is the context root
        ("build/", "src/build/x", False),  # patterns are anchored at the root
        # Unlike .gitignore, a file in a left-out directory can be let back in.
        ("data\n!data/keep.txt", "data/keep.txt", False),
        ("data\n!data/keep.txt", "data/other.txt", True),
        # The last pattern that matches decides.
        ("*.txt\n!a.txt\na.txt", "a.txt", True),
        ("# a comment\n\n  x  ", "x", True),
    ],
)
def test_dockerignore_rules_are_dockers(patterns: str, path: str, left_out: bool) -> None:
    assert ignored(path, parse_dockerignore(patterns)) is left_out


def mini_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    for rel in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, repo / rel)
    for rel in ("runtime/spotrun/__init__.py", "operator/spotrun_operator/__init__.py"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("# code\n")
    (repo / "examples").mkdir()
    for rel in ("Dockerfile", ".dockerignore", "train_linear.py", "__init__.py"):
        shutil.copy(ROOT / "examples" / rel, repo / "examples" / rel)
    return repo


def keys(repo: Path) -> dict[str, str]:
    return {name: imagebuild.key(name, repo) for name in imagebuild.NAMES}


def test_an_image_key_changes_with_what_its_build_reads_and_nothing_else(tmp_path: Path) -> None:
    repo = mini_repo(tmp_path)
    first = keys(repo)
    assert len(set(first.values())) == len(first)
    assert keys(repo) == first  # stable

    # Files the context leaves out, and files of no context: no image changes.
    (repo / "runtime" / "spotrun" / "__pycache__").mkdir()
    (repo / "runtime" / "spotrun" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_x.py").write_text("def test(): pass\n")
    (repo / "examples" / "notes.txt").write_text("not copied\n")
    assert keys(repo) == first

    # The runtime's code: both targets of the Dockerfile, and what is built FROM the runtime.
    (repo / "runtime" / "spotrun" / "__init__.py").write_text("# changed\n")
    second = keys(repo)
    assert {n for n in first if first[n] != second[n]} == {"operator", "runtime", "examples"}

    # The examples' code: the examples image only.
    (repo / "examples" / "train_linear.py").write_text("# changed\n")
    third = keys(repo)
    assert {n for n in second if second[n] != third[n]} == {"examples"}

    # The mode of a file is part of what COPY copies.
    (repo / "examples" / "train_linear.py").chmod(0o755)
    assert keys(repo)["examples"] != third["examples"]


def test_the_runtimes_dependencies_are_rebuilt_only_when_they_change(tmp_path: Path) -> None:
    repo = mini_repo(tmp_path)
    pyproject = repo / "pyproject.toml"
    first = keys(repo)

    # The tools' settings in pyproject.toml: spotrun's images, not its dependencies' layer.
    pyproject.write_text(pyproject.read_text() + "\n[tool.example]\nsetting = 1\n")
    second = keys(repo)
    assert {n for n in first if first[n] != second[n]} == {"operator", "runtime", "examples"}

    # A dependency: the dependencies' layer and every image above it.
    text = pyproject.read_text()
    assert '"numpy>=1.24"' in text
    pyproject.write_text(text.replace('"numpy>=1.24"', '"numpy>=2"'))
    third = keys(repo)
    changed = {n for n in second if second[n] != third[n]}
    assert changed == {"operator", "runtime-deps", "runtime", "examples"}


# -- the OCI layout -------------------------------------------------------------------------------


def put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def put_image(layout: Path, tag: str, layers: list[bytes]) -> None:
    config = put_blob(layout, json.dumps({"config": {"User": "10001:10001"}}).encode())
    config["mediaType"] = "application/vnd.oci.image.config.v1+json"
    layer_descs = [
        {**put_blob(layout, data), "mediaType": "application/vnd.oci.image.layer.v1.tar"}
        for data in layers
    ]
    manifest = {"schemaVersion": 2, "config": config, "layers": layer_descs}
    desc = put_blob(layout, json.dumps(manifest).encode())
    desc["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"manifests": []}
    index["schemaVersion"] = 2
    index["manifests"].append(desc)
    index_path.write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def test_the_nodes_import_stream_holds_each_shared_blob_once_under_full_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = tmp_path / "oci"
    put_image(layout, "spotrun-runtime-aaaa", [b"base", b"venv"])
    put_image(layout, "spotrun-examples-bbbb", [b"base", b"venv", b"examples"])
    put_image(layout, "spotrun-runtime-old0", [b"base", b"old venv"])
    monkeypatch.setattr(imagebuild, "layout_dir", lambda: layout)

    out = io.BytesIO()
    imagebuild.write_oci_archive(
        {
            "spotrun-runtime-aaaa": "spotrun.local/spotrun-runtime:dev",
            "spotrun-examples-bbbb": "spotrun.local/spotrun-examples:dev",
        },
        out,
    )
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        names = tar.getnames()
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        blobs = {n: tar.extractfile(n).read() for n in names if n.startswith("blobs/")}  # type: ignore[union-attr]
    assert len(names) == len(set(names))
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == [
        "spotrun.local/spotrun-runtime:dev",
        "spotrun.local/spotrun-examples:dev",
    ]
    layer_data = set(blobs.values())
    assert {b"base", b"venv", b"examples"} <= layer_data
    assert b"old venv" not in layer_data  # only what the named images reach
    # 2 manifests, 1 config (the same bytes), 3 layers.
    assert len(blobs) == 6


def test_dropping_a_tag_frees_only_the_blobs_no_other_tag_reaches(tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    put_image(layout, "spotrun-runtime-new1", [b"base", b"new venv"])
    put_image(layout, "spotrun-runtime-old0", [b"base", b"old venv"])
    index = json.loads((layout / "index.json").read_text())
    index["manifests"] = index["manifests"][:1]
    (layout / "index.json").write_text(json.dumps(index))
    imagebuild.gc_layout(layout)
    left = {p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}
    assert {b"base", b"new venv"} <= left
    assert b"old venv" not in left
