"""Checkpoint benchmark: spotrun's save and load against plain torch.save/torch.load, one run.

Arms, all on the same fsspec target (local files by default, --target to change):
  (a) training-loop stall per checkpoint: async `spotrun.report` vs synchronous torch.save
  (b) total training time added per checkpoint: async vs synchronous
  (c) save throughput: 2 ranks sharing the write vs rank 0 alone doing torch.save into
      fsspec.open, and vs a raw copy of the same bytes
  (d) load throughput: verified spotrun load vs torch.load
  (e) peak memory of a load: how much a fresh process's peak resident set (VmHWM) grows
      while it loads the checkpoint and touches every tensor, spotrun vs plain download +
      torch.load, beside the state size
Each worker runs in its own process; the training loop uses one thread (2-core machine).

    .venv/bin/python benchmarks/checkpoint_bench.py --size-mb 512
    .venv/bin/python benchmarks/checkpoint_bench.py --gcs --size-mb 256 --only memory
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spotrun.local.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
# The launcher through the interpreter, so the benchmark also runs where spotrun is on
# PYTHONPATH rather than installed (a GPU machine with its own torch).
SPOTRUN = [sys.executable, "-m", "spotrun.cli"]
PYTHONPATH = os.pathsep.join(
    [str(ROOT / "runtime"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)


def make_state(size_mb: int) -> dict[str, Any]:
    import torch

    chunks = max(1, size_mb // 64)
    per = size_mb * (1 << 20) // 4 // chunks
    return {
        "model": {f"layer{i}.weight": torch.full((per,), float(i)) for i in range(chunks)},
        "step": 0,
    }


def train_step(x: Any, w: Any) -> Any:
    import torch

    for _ in range(4):
        x = torch.tanh(x @ w)
    return x


# --- workers (run in child processes) --------------------------------------------------------


def open_target(url: str, mode: str) -> Any:
    """fsspec.open, with the emulator's anonymous token when the target is its bucket."""
    import fsspec

    from spotrun.store.storage import fsspec_options

    return fsspec.open(url, mode, **fsspec_options(url))


def worker_loop(arm: str, size_mb: int, steps: int, every: int, target: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    state = make_state(size_mb)
    x, w = torch.randn(512, 1024), torch.randn(1024, 1024) / 32
    stalls = []
    if arm == "async":
        import spotrun
        from spotrun.train.session import get_session

        spotrun.get_context()  # start the session (and its writer) before timing
        time.sleep(3)  # let the writer process finish importing torch
    started = time.perf_counter()
    for step in range(steps):
        x = train_step(x, w)
        for t in state["model"].values():  # the state changes every step, as weights do
            t[:1] += 1
        if (step + 1) % every:
            continue
        state["step"] = step
        t0 = time.perf_counter()
        if arm == "sync":
            with open_target(f"{target}/sync-{step}.pt", "wb") as f:
                torch.save(state, f)
        elif arm == "async":
            spotrun.report({"step": step}, checkpoint=spotrun.Checkpoint.from_dict(state))
        stalls.append(time.perf_counter() - t0)
    if arm == "async":
        get_session().flush()
    total = time.perf_counter() - started
    return {"total": total, "stalls": stalls}


def worker_save_rank(size_mb: int) -> dict[str, Any]:
    import torch

    import spotrun
    from spotrun.train.session import get_session

    torch.set_num_threads(1)
    state = make_state(size_mb)
    spotrun.get_context()
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    spotrun.report({"step": 0}, checkpoint=spotrun.Checkpoint.from_dict(state))
    get_session().flush()
    dist.barrier()
    return {"seconds": time.perf_counter() - t0}


def worker_save_single(
    size_mb: int, target: str, keep: bool, name: str = "single.pt"
) -> dict[str, Any]:
    import torch

    from spotrun.store import storage

    torch.set_num_threads(1)
    state = make_state(size_mb)
    t0 = time.perf_counter()
    with open_target(f"{target}/{name}", "wb") as f:
        torch.save(state, f)
    save = time.perf_counter() - t0
    if keep:
        return {"save": save}
    storage.remove_tree(f"{target}/single.pt")
    raw = b"\1" * (size_mb << 20)
    t0 = time.perf_counter()
    with open_target(f"{target}/raw.bin", "wb") as f:
        f.write(raw)
    copy = time.perf_counter() - t0
    storage.remove_tree(f"{target}/raw.bin")
    return {"save": save, "copy": copy}


def worker_load(target: str, uri: str, ours_first: bool) -> dict[str, Any]:
    import torch

    from spotrun.train.checkpoint import Checkpoint

    torch.set_num_threads(1)

    def baseline() -> float:
        t0 = time.perf_counter()
        with open_target(f"{target}/single.pt", "rb") as f:
            torch.load(f, weights_only=True)
        return time.perf_counter() - t0

    def ours() -> float:
        t0 = time.perf_counter()
        Checkpoint.from_uri(uri).to_dict()
        return time.perf_counter() - t0

    if ours_first:
        spotrun_s = ours()
        return {"spotrun": spotrun_s, "torch_load": baseline()}
    baseline_s = baseline()
    return {"torch_load": baseline_s, "spotrun": ours()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _touch(state: Any) -> int:
    """Reads every tensor (memory-mapped ones become resident); returns their bytes."""
    import torch

    if isinstance(state, torch.Tensor):
        state.sum()
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_touch(v) for v in state.values())
    return 0


def worker_load_memory(arm: str, url: str, warm: str) -> dict[str, Any]:
    """Peak resident-set growth of one load: the peak is reset (/proc/self/clear_refs) after
    the imports and a small warm-up load, then read (VmHWM) once every tensor was touched.
    ru_maxrss would not do: a child starts with its parent's at the fork."""
    import torch

    from spotrun.train.checkpoint import Checkpoint

    torch.set_num_threads(1)

    def load(source: str) -> Any:
        if arm == "spotrun":
            return Checkpoint.from_uri(source).to_dict()
        with open_target(source, "rb") as f:
            return torch.load(f, weights_only=True)

    _touch(load(warm))
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    baseline = _status_kb("VmRSS")
    size = _touch(load(url))
    return {"baseline_kb": baseline, "peak_kb": _status_kb("VmHWM"), "state_bytes": size}


# --- orchestration ---------------------------------------------------------------------------


def contract_env(storage: str, job: str, nproc: int, async_save: bool) -> dict[str, str]:
    from spotrun.contract import CheckpointSettings, PodContract

    contract = PodContract(
        job=job,
        namespace="bench",
        nproc_per_node=nproc,
        storage=storage,
        master_port=free_port(),
        checkpoint=CheckpointSettings(num_to_keep=1, async_save=async_save),
    )
    return {
        **os.environ,
        **contract.to_env(),
        "SPOTRUN_STATUS_SINK": "none",
        # The state is on the CPU; on a GPU machine with fewer GPUs than ranks, hide them.
        **({"CUDA_VISIBLE_DEVICES": ""} if nproc > 1 else {}),
        "PYTHONPATH": PYTHONPATH,
    }


def child(
    mode: str, env: dict[str, str] | None = None, nproc: int = 0, **kwargs: Any
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", mode, "--args", json.dumps(kwargs)]
    if nproc:
        cmd = [*SPOTRUN, "launch", "--nproc-per-node", str(nproc), "--", *cmd]
    out = subprocess.run(
        cmd,
        env=env or {**os.environ, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        check=False,
    )
    results = [
        json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")
    ]
    if out.returncode or not results:
        raise SystemExit(f"{mode} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return results[0]


def spread(values: list[float]) -> str:
    """Median, with the range over the repetitions."""
    return f"{statistics.median(values):7.0f} MB/s  (range {min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="repetitions of the throughput arms (c) and (d), in alternating order",
    )
    target_group = parser.add_mutually_exclusive_group()
    target_group.add_argument(
        "--target", default=None, help="fsspec URL of a folder (default: a temp folder)"
    )
    target_group.add_argument(
        "--gcs",
        action="store_true",
        help="target a bucket on a fake-gcs-server started for this run (127.0.0.1)",
    )
    parser.add_argument(
        "--only",
        choices=["memory"],
        default=None,
        help="run only one arm: memory, the peak-RSS arm (e)",
    )
    parser.add_argument("--worker")
    parser.add_argument("--args", default="{}")
    args = parser.parse_args()
    if args.worker:
        fn = {
            "loop": worker_loop,
            "save_rank": worker_save_rank,
            "save_single": worker_save_single,
            "load": worker_load,
            "load_memory": worker_load_memory,
        }[args.worker]
        result = fn(**json.loads(args.args))
        if os.environ.get("RANK", "0") == "0":
            print("RESULT " + json.dumps(result), flush=True)
        return

    with contextlib.ExitStack() as stack:
        if args.gcs:
            sys.path.insert(0, str(ROOT))
            from tests.fixtures.gcs import running_emulator

            emulator = stack.enter_context(running_emulator())
            os.environ.update(emulator.env)
            target = f"{emulator.new_bucket()}/bench"
        elif args.target:
            target = args.target.rstrip("/")
        else:
            tmp = tempfile.mkdtemp(prefix="spotrun-bench-", dir=os.environ.get("BENCH_TMP"))
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            target = tmp
        run(args, target)


def run(args: argparse.Namespace, target: str) -> None:
    from spotrun.store import storage

    size = mb = args.size_mb
    print(
        f"state {size} MB, {args.steps} steps, a checkpoint every {args.every}; target {target}\n"
    )
    if args.only == "memory":
        memory(args, target)
        return
    base = child(
        "loop", arm="none", size_mb=size, steps=args.steps, every=args.every, target=target
    )
    sync = child(
        "loop", arm="sync", size_mb=size, steps=args.steps, every=args.every, target=target
    )
    asyn = child(
        "loop",
        contract_env(f"{target}/async", "loop", 1, True),
        arm="async",
        size_mb=size,
        steps=args.steps,
        every=args.every,
        target=target,
    )
    n = len(sync["stalls"])
    stall_sync, stall_async = statistics.median(sync["stalls"]), statistics.median(asyn["stalls"])
    added_sync = (sync["total"] - base["total"]) / n
    added_async = (asyn["total"] - base["total"]) / n
    print("(a) training-loop stall per checkpoint (median)")
    print(f"    sync torch.save   {stall_sync:7.3f} s")
    print(
        f"    spotrun async     {stall_async:7.3f} s    ratio {stall_async / stall_sync:.3f}x  (goal <= 0.1x)"
    )
    print("(b) total training time added per checkpoint")
    print(f"    loop alone        {base['total']:7.2f} s for {args.steps} steps")
    print(f"    sync torch.save   {added_sync:7.3f} s")
    print(
        f"    spotrun async     {added_async:7.3f} s    ratio {added_async / added_sync:.3f}x  (goal <= 1.0x)",
        flush=True,
    )
    for leftover in ("async", *(f"sync-{s}.pt" for s in range(args.steps))):
        storage.remove_tree(f"{target}/{leftover}")

    # The arms alternate which goes first, and each timed save starts with the previous one's
    # files deleted: on a VM, pages the guest has not used lately cost far more to fill than
    # recycled ones, and an arm that always came second would always pay for that.
    print(f"\n(c) and (d): {args.repeat} repetitions, arms alternating")
    two_s, one_s, copy_s, ratios_c, load_s, torch_load_s, ratios_d = [], [], [], [], [], [], []

    def save_two(folder: str) -> dict[str, Any]:
        return child("save_rank", contract_env(folder, "two", 2, False), nproc=2, size_mb=size)

    for rep in range(args.repeat):
        if rep % 2:
            single = child("save_single", size_mb=size, target=target, keep=False)
            two = save_two(f"{target}/two")
        else:
            two = save_two(f"{target}/two")
            single = child("save_single", size_mb=size, target=target, keep=False)
        storage.remove_tree(f"{target}/two")
        # The files to load, written again outside the timing.
        save_two(f"{target}/two")
        child("save_single", size_mb=size, target=target, keep=True)
        uri = f"{target}/two/bench/two/ckpt-000000"
        load = child("load", target=target, uri=uri, ours_first=rep % 2 == 0)
        for leftover in ("two", "single.pt"):
            storage.remove_tree(f"{target}/{leftover}")
        two_s.append(mb / two["seconds"])
        one_s.append(mb / single["save"])
        copy_s.append(mb / single["copy"])
        ratios_c.append(single["save"] / two["seconds"])
        load_s.append(mb / load["spotrun"])
        torch_load_s.append(mb / load["torch_load"])
        ratios_d.append(load["torch_load"] / load["spotrun"])
        print(
            f"    rep {rep}: save {two_s[-1]:5.0f} vs {one_s[-1]:5.0f} MB/s ({ratios_c[-1]:.2f}x), "
            f"load {load_s[-1]:5.0f} vs {torch_load_s[-1]:5.0f} MB/s ({ratios_d[-1]:.2f}x)",
            flush=True,
        )
    ratio_c, ratio_d = statistics.median(ratios_c), statistics.median(ratios_d)
    print("(c) save throughput")
    print(f"    rank 0 torch.save {spread(one_s)}")
    print(f"    raw copy          {spread(copy_s)}")
    print(f"    spotrun 2 ranks   {spread(two_s)}")
    print(
        f"    ratio {ratio_c:.2f}x vs torch.save (goal >= 2x), "
        f"{statistics.median(two_s) / statistics.median(copy_s):.2f}x vs raw copy"
    )
    print("(d) load throughput (spotrun verifies sha256 before unpickling)")
    print(f"    torch.load        {spread(torch_load_s)}")
    print(f"    spotrun           {spread(load_s)}")
    print(f"    ratio {ratio_d:.2f}x vs torch.load (goal >= 2x)")
    memory(args, target)


def memory(args: argparse.Namespace, target: str) -> None:
    from spotrun.store import storage

    size = args.size_mb

    def save_two(folder: str, mb: int) -> None:
        child("save_rank", contract_env(folder, "two", 2, False), nproc=2, size_mb=mb)

    save_two(f"{target}/two", size)
    save_two(f"{target}/warm", 1)
    child("save_single", size_mb=size, target=target, keep=True)
    child("save_single", size_mb=1, target=target, keep=True, name="warm.pt")
    ckpt = "bench/two/ckpt-000000"
    arms = {
        "torch": (f"{target}/single.pt", f"{target}/warm.pt"),
        "spotrun": (f"{target}/two/{ckpt}", f"{target}/warm/{ckpt}"),
    }
    grown: dict[str, list[float]] = {arm: [] for arm in arms}
    state = 0
    for rep in range(args.repeat):
        for arm in sorted(arms, reverse=rep % 2 == 1):
            url, warm = arms[arm]
            result = child("load_memory", arm=arm, url=url, warm=warm)
            state = result["state_bytes"]
            grown[arm].append((result["peak_kb"] - result["baseline_kb"]) * 1024 / state)
    for leftover in ("two", "warm", "single.pt", "warm.pt"):
        storage.remove_tree(f"{target}/{leftover}")
    print(f"(e) peak memory of a load: growth of the peak RSS, {args.repeat} repetitions")
    print(f"    state             {state / (1 << 20):7.0f} MB")
    for arm, label in (("torch", "fsspec + torch.load"), ("spotrun", "spotrun (verified)")):
        ratio = statistics.median(grown[arm])
        print(
            f"    {label:<19} {ratio * state / (1 << 20):5.0f} MB   {ratio:.2f}x the state "
            f"(range {min(grown[arm]):.2f}-{max(grown[arm]):.2f})"
            + ("  (goal <= 1.3x)" if arm == "spotrun" else "")
        )


if __name__ == "__main__":
    main()
