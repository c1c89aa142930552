"""Saves or restores a directory checkpoint from every rank (config: mode save|load, out).

Each rank's directory holds nested folders, an empty file, a file only it has and a file
every rank has (the lowest rank's copy is the one restored).
"""

from __future__ import annotations

import json
import os
import tempfile

import spotrun
from spotrun import Checkpoint

ctx = spotrun.get_context()
cfg = ctx.config
rank = ctx.world_rank


def expected(world: int) -> dict[str, str]:
    files = {"shared.txt": "from rank 0", "deep/a/b/c.txt": "nested", "empty": ""}
    files.update({f"only-{r}/data.bin": f"rank {r} " * 1000 for r in range(world)})
    return files


if cfg["mode"] == "save":
    source = tempfile.mkdtemp(prefix="spotrun-dir-")
    mine = {
        "shared.txt": f"from rank {rank}",
        "deep/a/b/c.txt": "nested",
        "empty": "",
        f"only-{rank}/data.bin": f"rank {rank} " * 1000,
    }
    for rel, text in mine.items():
        os.makedirs(os.path.dirname(os.path.join(source, rel)), exist_ok=True)
        with open(os.path.join(source, rel), "w") as out:
            out.write(text)
    spotrun.report({"step": 3}, checkpoint=Checkpoint.from_directory(source))
else:
    checkpoint = spotrun.get_checkpoint()
    assert checkpoint is not None and checkpoint.kind == "directory", checkpoint
    target = os.path.join(cfg["out"], f"rank-{rank}")
    checkpoint.to_directory(target)
    found = {}
    for folder, _, names in os.walk(target):
        for name in names:
            path = os.path.join(folder, name)
            with open(path) as handle:
                found[os.path.relpath(path, target)] = handle.read()
    want = expected(int(cfg["saved_world"]))
    assert found == want, json.dumps({"found": sorted(found), "want": sorted(want)})
    with checkpoint.as_directory() as tmp:
        assert os.path.isfile(os.path.join(tmp, "deep/a/b/c.txt"))
    assert not os.path.exists(tmp), "as_directory leaves nothing behind"
    print(f"rank {rank} restored {len(found)} files", flush=True)
