"""What the built images hold, checked against what they should: read from their layers.

`hack/images check` and the node tier run these rules on the images of the cache's OCI
layout (tests/node/test_images.py also runs each image's entrypoint on the node). The
rules, per image: the non-root user the chart runs as (10001:10001); no compiler (the build
stages install wheels only); the operator: no pip at all, and `python -m spotrun_operator`
as the entrypoint; the runtime: pip kept in its virtualenv (derived images install their
dependencies with it) and `spotrun` on PATH; the examples image: the examples package in
/workspace, where the launcher imports `examples.train_linear:...` from.
"""

from __future__ import annotations

import re
import subprocess
import tarfile
from collections.abc import Sequence
from typing import Any

from .imagebuild import blob_path, image_info, key, read_json_blob

USER = "10001:10001"
# A compiler's driver or proper, wherever it is: gcc, cc, c++, clang, cc1 (gcc's proper)...
COMPILER = re.compile(
    r"(^|/)((x86_64-linux-gnu-)?(gcc|g\+\+|cpp|c\+\+|cc)(-\d+)?|clang(\+\+)?(-\d+)?|tcc|cc1|cc1plus)$"
)
BIN_DIRS = (
    "bin/",
    "sbin/",
    "usr/bin/",
    "usr/sbin/",
    "usr/local/bin/",
    "usr/lib/gcc/",
    "usr/libexec/",
)
PIP = re.compile(r"(^|/)(site|dist)-packages/pip/__init__\.py$|(^|/)bin/pip(3(\.\d+)?)?$")


def layer_entries(media_type: str, path: str) -> list[tarfile.TarInfo]:
    """The entries of one layer blob (gzip or zstd or plain tar), in order."""
    if media_type.endswith("+zstd"):
        proc = subprocess.Popen(["zstd", "-dcq", path], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            entries = list(tar)
        if proc.wait() != 0:
            raise RuntimeError(f"zstd -d {path} failed")
        return entries
    with tarfile.open(path, "r:gz" if media_type.endswith("gzip") else "r:") as tar:
        return list(tar)


def filesystem(name: str, k: str | None = None) -> dict[str, tarfile.TarInfo]:
    """The image's files as its layers make them (whiteouts applied): path -> entry."""
    info = image_info(name, k or key(name))
    manifest = read_json_blob(info["digest"])
    fs: dict[str, tarfile.TarInfo] = {}
    for layer in manifest["layers"]:
        for entry in layer_entries(layer["mediaType"], str(blob_path(layer["digest"]))):
            path = entry.name.removeprefix("./").strip("/")
            parent, _, base = path.rpartition("/")
            if base == ".wh..wh..opq":  # opaque: what lower layers had in PARENT is gone
                for p in [p for p in fs if p.startswith(f"{parent}/")]:
                    del fs[p]
            elif base.startswith(".wh."):
                gone = f"{parent}/{base[4:]}" if parent else base[4:]
                for p in [p for p in fs if p == gone or p.startswith(f"{gone}/")]:
                    del fs[p]
            else:
                fs[path] = entry
    return fs


def problems_of(name: str, config: dict[str, Any], paths: Sequence[str]) -> list[str]:
    """What is wrong with image NAME, given its config and its file paths (none: [])."""
    found = []
    if config.get("User") != USER:
        found.append(f"{name}: runs as {config.get('User')!r}, not {USER}")
    compilers = [p for p in paths if p.startswith(BIN_DIRS) and COMPILER.search(p)]
    if compilers:
        found.append(f"{name}: holds a compiler: {', '.join(sorted(compilers)[:5])}")
    pips = [p for p in paths if PIP.search(p)]
    path_env = next((e for e in config.get("Env", []) if e.startswith("PATH=")), "")
    if name == "operator":
        if pips:
            found.append(f"{name}: holds pip: {', '.join(sorted(pips))}")
        if config.get("Entrypoint") != ["python", "-m", "spotrun_operator"]:
            found.append(f"{name}: entrypoint is {config.get('Entrypoint')}")
    else:
        if "opt/spotrun/bin/pip" not in paths:
            found.append(f"{name}: its virtualenv has no pip (derived images install with it)")
        if "opt/spotrun/bin/spotrun" not in paths or "/opt/spotrun/bin" not in path_env:
            found.append(f"{name}: no `spotrun` on PATH ({path_env})")
        if config.get("Cmd") != ["spotrun", "--help"]:
            found.append(f"{name}: CMD is {config.get('Cmd')}")
    if name == "examples" and "workspace/examples/train_linear.py" not in paths:
        found.append(f"{name}: no examples package in /workspace")
    return found


def check(names: Sequence[str]) -> list[str]:
    found = []
    for name in names:
        info = image_info(name, key(name))
        found += problems_of(name, info["config"], list(filesystem(name)))
    return found
