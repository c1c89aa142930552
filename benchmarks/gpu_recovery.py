"""GPU recovery benchmark: what a warm recovery costs on a GPU, beside its baselines, in one run.

Issue #13's GPU tier. On a machine with a CUDA GPU, in this process:

  (a) group re-initialisation: a survivor of a warm recovery leaves its broken group and
      joins the next one in the same process (torch, the CUDA context and the allocator
      stay). Timed: spotrun.train.group's "cpu:gloo,cuda:nccl" group, left as
      regroup.rejoin leaves it (destroy_process_group) and joined again, up to the end of
      the first CUDA all_reduce (NCCL creates its communicator lazily, there). Baseline: a
      fresh process doing the same from nothing (python, torch's import, the CUDA context,
      NCCL), which is what a cold restart pays per worker. World size 1: one GPU cannot hold
      a group of two (NCCL refuses two ranks on one device), so the peers' link setup is
      not in either figure.
  (b) snapshot, GPU -> host: spotrun's writer (WriterClient.save, into the shared-memory
      buffer that a peer or the next session serves the state from; it page-locks that
      buffer for a GPU state) against a copy of the same tensors into pinned host memory,
      and into ordinary (pageable) host memory, as the writer did before it pinned.
  (c) restore, host -> GPU: what a warm session hands the training code (get_checkpoint():
      copies of the snapshot's tensors, regroup.MemorySnapshot.tensors(copy=True)) copied
      into the model's tensors on the GPU, as load_state_dict does; beside the same from
      views of the buffer (no host copy first), from copies made in pinned memory (what
      get_checkpoint() could hand a GPU worker), and a pinned host-to-device copy of the
      same bytes.

Prints seconds, GB/s and the ratios to the baselines. Without a GPU it runs (b) and (c)
on the CPU only as a check of the script itself (`--device cpu`).

    python3 benchmarks/gpu_recovery.py --size-gb 1,8
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# spotrun from this checkout, here and in the processes it starts (the writer, (a)'s baseline).
sys.path.insert(0, str(ROOT / "runtime"))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "runtime"), *filter(None, [os.environ.get("PYTHONPATH")])]
)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from spotrun.local.ports import free_port  # noqa: E402
from spotrun.store.tree import flatten, unflatten  # noqa: E402
from spotrun.train import group, regroup  # noqa: E402
from spotrun.train.writer import WriterClient, WriterConfig  # noqa: E402

PIECE = 256 << 20  # the state: tensors of 256 MiB (a large model's big matrices)
GB = 1e9

COLD_GROUP = """
import time
import torch, torch.distributed as dist
from spotrun.train import group
group.init_process_group()
x = torch.ones(1, device="cuda")
dist.all_reduce(x)
torch.cuda.synchronize()
print("done", time.time())
dist.destroy_process_group()
"""


def log(msg: str) -> None:
    print(f"gpu_recovery: {msg}", file=sys.stderr, flush=True)


def group_env(port: int) -> dict[str, str]:
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }


def first_all_reduce() -> None:
    x = torch.ones(1, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()


def bench_group(runs: int) -> list[tuple[str, float]]:
    """(a): seconds to a working group, re-initialised in this process and in a fresh one."""
    cold = []
    for _ in range(runs):
        env = {**os.environ, **group_env(free_port())}
        started = time.time()
        out = subprocess.run(
            [sys.executable, "-c", COLD_GROUP], env=env, capture_output=True, text=True, check=True
        )
        done = float(out.stdout.split()[-1])
        cold.append(done - started)
    os.environ.update(group_env(free_port()))
    started = time.perf_counter()
    group.init_process_group()
    first_all_reduce()
    first = time.perf_counter() - started
    warm = []
    for _ in range(runs):
        started = time.perf_counter()
        dist.destroy_process_group()  # as regroup.rejoin leaves a group
        os.environ.update(group_env(free_port()))  # a rendezvous port per attempt
        group.init_process_group()
        first_all_reduce()
        warm.append(time.perf_counter() - started)
    dist.destroy_process_group()
    log(f"group: cold {fmt(cold)}; first in this process {first:.3f}s; again {fmt(warm)}")
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    return [
        ("group, fresh process (s)", cold_s),
        ("group, first in a process (s)", first),
        ("group, again in the same process (s)", warm_s),
        ("again / fresh", warm_s / cold_s),
    ]


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}s" for v in values)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def bench_state(size: int, device: torch.device, runs: int, root: str) -> list[tuple[str, float]]:
    """(b) and (c) for a state of `size` bytes on `device`."""
    count = max(1, size // PIECE)
    state = {
        f"layer{i}.weight": torch.randn(PIECE // 4, device=device).view(-1, 4096)
        for i in range(count)
    }
    total = sum(t.nbytes for t in state.values())
    skeleton, tensors = flatten(state)
    config = WriterConfig(root=root, rank=0, attempt=1, world_size=1, job="gpu", namespace="bench")
    writer = WriterClient(config)
    try:
        snap_times = []
        for seq in range(runs + 1):  # the first save maps the buffer in: counted apart
            save = functools.partial(
                writer.save, seq, "replicated", None, dict(enumerate(tensors)), write=[]
            )
            snap_times.append(timed(save, device))
            writer.drain_save()
        assert writer.snapshot is not None
        slots, used, buffer = writer.snapshot
        snapshot = regroup.MemorySnapshot(
            seq=runs,
            step=0,
            skeleton=skeleton,
            slots=[regroup.Slot(s.index, s.offset, s.dtype, s.shape, s.count) for s in slots],
            buffer=buffer,
            size=used,
        )
        pinned = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
        pageable = torch.ones(total, dtype=torch.uint8)  # touched: no first-use page faults
        offsets = []
        at = 0
        for t in tensors:
            offsets.append((at, t))
            at += t.nbytes

        def to_host(host: torch.Tensor) -> None:
            for at, t in offsets:
                host[at : at + t.nbytes].view(t.dtype).view(t.shape).copy_(t)

        def from_host(host: torch.Tensor) -> None:
            for at, t in offsets:
                t.copy_(host[at : at + t.nbytes].view(t.dtype).view(t.shape), non_blocking=True)

        def restore(copy: bool) -> None:
            data = unflatten(snapshot.skeleton, snapshot.tensors(copy=copy).__getitem__)
            with torch.no_grad():
                for name, t in state.items():
                    t.copy_(data[name])

        def restore_pinned_copies() -> None:
            # A candidate for get_checkpoint() on a GPU worker: its copies in pinned memory.
            views = snapshot.tensors(copy=False)
            copies = {}
            for i, v in views.items():
                copies[i] = torch.empty(v.shape, dtype=v.dtype, pin_memory=device.type == "cuda")
                copies[i].copy_(v)
            data = unflatten(snapshot.skeleton, copies.__getitem__)
            with torch.no_grad():
                for name, t in state.items():
                    t.copy_(data[name], non_blocking=True)

        pinned_d2h = [timed(lambda: to_host(pinned), device) for _ in range(runs)]
        pageable_d2h = [timed(lambda: to_host(pageable), device) for _ in range(runs)]
        served = [timed(lambda: restore(True), device) for _ in range(runs)]
        views = [timed(lambda: restore(False), device) for _ in range(runs)]
        pinned_copies = [timed(restore_pinned_copies, device) for _ in range(runs)]
        pinned_h2d = [timed(lambda: from_host(pinned), device) for _ in range(runs)]
        pageable_h2d = [timed(lambda: from_host(pageable), device) for _ in range(runs)]
        # The restored state is the snapshot's: bit for bit.
        check = snapshot.tensors(copy=False)
        for i, t in enumerate(tensors):
            assert torch.equal(check[i], t.cpu()), f"tensor {i} differs after the restore"
    finally:
        writer.close()
    label = f"{total / (1 << 30):g} GiB"
    log(
        f"{label}: snapshot first {snap_times[0]:.3f}s, then {fmt(snap_times[1:])}; pinned "
        f"{fmt(pinned_d2h)}; restore served {fmt(served)}, views {fmt(views)}, pinned {fmt(pinned_h2d)}"
    )
    snap = statistics.median(snap_times[1:])
    d2h, h2d = statistics.median(pinned_d2h), statistics.median(pinned_h2d)
    slow_d2h, slow_h2d = statistics.median(pageable_d2h), statistics.median(pageable_h2d)
    got, view = statistics.median(served), statistics.median(views)
    pinned_got = statistics.median(pinned_copies)
    return [
        (f"{label} snapshot, spotrun writer (GB/s)", total / snap / GB),
        (f"{label} snapshot, its first (GB/s)", total / snap_times[0] / GB),
        (f"{label} GPU -> pinned host (GB/s)", total / d2h / GB),
        (f"{label} GPU -> pageable host (GB/s)", total / slow_d2h / GB),
        (f"{label} snapshot / pinned (time)", snap / d2h),
        (f"{label} restore, get_checkpoint's copies (GB/s)", total / got / GB),
        (f"{label} restore, buffer views (GB/s)", total / view / GB),
        (f"{label} restore, copies in pinned memory (GB/s)", total / pinned_got / GB),
        (f"{label} pinned host -> GPU (GB/s)", total / h2d / GB),
        (f"{label} pageable host -> GPU (GB/s)", total / slow_h2d / GB),
        (f"{label} restore / pinned (time)", got / h2d),
        (f"{label} views / pinned (time)", view / h2d),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", default="1,8", help="state sizes in GiB, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_recovery: no CUDA GPU here; --device cpu checks the script only")
    device = torch.device(args.device)
    rows: list[tuple[str, float]] = []
    if device.type == "cuda":
        log(
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}"
        )
        rows += bench_group(args.runs)
    with tempfile.TemporaryDirectory(prefix="spotrun-gpu-bench-") as root:
        for gib in (float(s) for s in args.size_gb.split(",")):
            rows += bench_state(int(gib * (1 << 30)), device, args.runs, root)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    width = max(len(name) for name, _ in rows)
    print(f"\nwarm recovery on {device.type}, medians of {args.runs}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:10.3f}")


if __name__ == "__main__":
    main()
