"""Goodput benchmark: how much of the wall time a job trains when its capacity keeps going.

One invocation runs the same TrainJob (examples/trainjob.yaml's demo job by default, 2
replicas x 1 worker) through `spotrun run` several ways, side by side:

  fault-free     no injected fault: the baseline
  warm           a seeded fault (a preemption with notice, or a kill without) every
                 --every seconds of training on average, spec.recovery: Warm
  spare          the warm arm with --spares K warm spares (started, imports done, waiting):
                 a lost replica's place is taken by a spare, which a new one then replaces
  pool           the warm arm with spec.spares K (the operator's way: replicas + K pods by
                 ordinal, a waiting one takes a lost member's place in status.group.members)
  cold           the same seeded faults, spec.recovery: Cold (the whole group restarts)

With --unavailable-for SECONDS, two more arms where a replica hit by a fault has no capacity
for that long (`spotrun run --unavailable-for`), side by side:

  away-fixed     the warm job: the group waits for the lost replica to come back
  away-elastic   the warm job with spec.elastic (minReplicas 1): the survivors go on alone
                 after elastic.waitSeconds (2 s here) and the group grows back later

With --real-node, the same demo job runs as a TrainJob under the operator on the real node
of `hack/cluster up --real-node` (a kubelet on containerd; --run-dir names a running one,
else one is started and stopped), the benchmark injecting the same seeded faults into pods
(benchmarks/goodput_node.py): a graceful pod deletion for a preemption, SIGKILL to the
trainer container and a forced deletion for a kill. Its arms: fault-free, warm, pool
(spec.spares, the spares a cluster has), cold, and idle-pool (the pool arm's job without
faults: what its waiting spares cost a group that loses nothing).

Goodput is the fault-free wall time divided by the faulted wall time (1.0: faults cost
nothing). The faults are drawn from one seed per repetition, so the warm and cold arms of a
repetition see the same schedule; arms alternate between repetitions, and medians print.

    .venv/bin/python benchmarks/goodput.py                      # demo job, a fault every 10 s
    .venv/bin/python benchmarks/goodput.py --every 20 --repeat 3 --steps 400
    .venv/bin/python benchmarks/goodput.py --unavailable-for 30 --faults kill
    .venv/bin/python benchmarks/goodput.py --arms warm,spare --random-intervals
    .venv/bin/python benchmarks/goodput.py --arms warm,spare --faults freeze --peer-timeout 2
    .venv/bin/python benchmarks/goodput.py --real-node --run-dir DIR --arms warm,pool
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "trainjob.yaml"
SPOTRUN = [sys.executable, "-m", "spotrun.cli"]
PYTHONPATH = os.pathsep.join(
    [str(ROOT / "runtime"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)


def job_file(
    folder: Path, recovery: str, steps: int | None, elastic: bool = False, spares: int = 0
) -> Path:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["recovery"] = recovery
    if spares:
        manifest["spec"]["spares"] = spares
    if steps is not None:
        manifest["spec"]["config"]["steps"] = steps
    if elastic:
        manifest["spec"]["elastic"] = {"minReplicas": 1, "waitSeconds": 2, "batch": "perReplica"}
    kind = f"{'-elastic' if elastic else ''}{f'-spares{spares}' if spares else ''}"
    path = folder / f"job-{recovery.lower()}{kind}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def run_once(job: Path, storage: Path, faults: list[str], timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run(
        [*SPOTRUN, "run", str(job), "--storage", str(storage), "--no-live", *faults],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(
            f"spotrun run {job.name} {' '.join(faults)} failed:\n{proc.stdout}{proc.stderr}"
        )
    status_path = next(storage.glob("*/*/status.json"))
    status = json.loads(status_path.read_text())
    entries = status.get("interruptions") or []
    return {
        "wall": wall,
        "interruptions": int(status.get("preemptions", 0)) + int(status.get("failures", 0)),
        "recovery": sorted({str(e.get("recovery", "?")) for e in entries}),
        "steps_lost": sum(int(e.get("stepsLost", 0)) for e in entries),
        "recover_seconds": [
            float(e["secondsToRecover"]) for e in entries if "secondsToRecover" in e
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--every", type=float, default=10.0, help="mean seconds of training between faults"
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="override the job's config.steps")
    parser.add_argument(
        "--faults",
        choices=("mixed", "preempt", "kill", "freeze"),
        default="mixed",
        help=(
            "preemptions with notice, kills without, or both (each at twice the interval); "
            "freeze: replicas gone silent (SIGSTOP, local mode), found by their peers' watch"
        ),
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=None,
        help="SPOTRUN_PEER_TIMEOUT_SECONDS of the runs (default: the runtime's, 10 s)",
    )
    parser.add_argument(
        "--spares", type=int, default=1, help="warm spares of the spare and pool arms"
    )
    parser.add_argument(
        "--random-intervals",
        action="store_true",
        help=(
            "faults as a Poisson process (`spotrun run --random-intervals`: each interval "
            "drawn from an exponential distribution with that mean) instead of exact "
            "intervals (in the mixed schedule exact intervals alternate: a preemption, "
            "--every seconds later a kill, and so on)"
        ),
    )
    parser.add_argument(
        "--unavailable-for",
        type=float,
        default=0.0,
        help="add the arms where a faulted replica has no capacity for this many seconds",
    )
    parser.add_argument(
        "--arms",
        default=None,
        help="comma-separated arms to run (default: all); fault-free always runs, as the base",
    )
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument(
        "--real-node",
        action="store_true",
        help="run the arms as TrainJobs on the real node of `hack/cluster up --real-node`",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="with --real-node: a running cluster's run dir (default: start one, stop it after)",
    )
    parser.add_argument(
        "--mtbf-env",
        action="store_true",
        help=(
            "with --real-node: give the faulted arms' trainers SPOTRUN_MTBF_SECONDS, the "
            "faults' mean interval, as `spotrun run` does (default: as a user's job runs, "
            "the cadences assume 3600 s until the first interruption, then the job's own "
            "from its ledger, status.group.mtbfSeconds)"
        ),
    )
    args = parser.parse_args()
    if args.run_dir is not None and not args.real_node:
        parser.error("--run-dir needs --real-node")
    if args.mtbf_env and not args.real_node:
        parser.error("--mtbf-env is --real-node's (`spotrun run` sets it for injected faults)")
    if args.real_node and args.faults == "freeze":
        parser.error("--faults freeze is local mode's (spotrun run --freeze-every) only")
    if args.peer_timeout is not None:
        os.environ["SPOTRUN_PEER_TIMEOUT_SECONDS"] = f"{args.peer_timeout:g}"
    if args.real_node and args.unavailable_for:
        parser.error("--unavailable-for is local mode's (spotrun run --unavailable-for) only")

    # Seconds of training between faults, by kind: in the mixed schedule each kind at twice
    # the interval, so that together they come every --every seconds.
    every: dict[str, float] = (
        {"preempt": 2 * args.every, "kill": 2 * args.every}
        if args.faults == "mixed"
        else {args.faults: args.every}
    )

    arms: tuple[str, ...] = ("fault-free", "warm", "spare", "pool", "cold")
    if args.real_node:
        import goodput_node  # benchmarks/goodput_node.py, beside this file

        arms = tuple(goodput_node.ARMS)
    if args.unavailable_for:
        arms += ("away-fixed", "away-elastic")
    if args.arms:
        wanted = {"fault-free", *args.arms.split(",")}
        unknown = wanted - set(arms)
        if unknown:
            where = " on the real node (its spares are the pool arm's)" if args.real_node else ""
            parser.error(f"unknown arms {sorted(unknown)}; the arms{where} are {', '.join(arms)}")
        arms = tuple(arm for arm in arms if arm in wanted)
    results = (run_node if args.real_node else run_local)(args, arms, every)
    report(args, arms, results)
    return 0


def run_node(
    args: argparse.Namespace, arms: tuple[str, ...], every: dict[str, float]
) -> dict[str, list[dict[str, Any]]]:
    """The arms on the real node, each repetition's faults from one seed, arms alternating."""
    import goodput_node
    import recovery

    own = args.run_dir is None
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="goodput-cluster-"))
    if own:
        print(f"starting a cluster with a real node in {run_dir}", flush=True)
        recovery.hack_cluster("up", "--real-node", f"--run-dir={run_dir}")
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    try:
        for rep in range(args.repeat):
            for arm in list(arms) if rep % 2 == 0 else list(reversed(arms)):
                result = goodput_node.run_arm(
                    run_dir,
                    arm,
                    rep,
                    every,
                    random_intervals=args.random_intervals,
                    spares=args.spares,
                    steps=args.steps,
                    timeout=args.timeout,
                    mtbf_env=args.mtbf_env,
                )
                results[arm].append(result)
                print_run(rep, arm, result)
    finally:
        if own:
            recovery.hack_cluster("down", f"--run-dir={run_dir}")
    return results


def print_run(rep: int, arm: str, result: dict[str, Any]) -> None:
    print(
        f"rep {rep} {arm:>10}: {result['wall']:7.1f}s, {result['interruptions']} "
        f"interruption(s) {','.join(result['recovery']) or '-'}, "
        f"{result['steps_lost']} step(s) lost, recovered in "
        + (", ".join(f"{s:.1f}s" for s in result["recover_seconds"]) or "-")
        + (
            ", training again in " + ", ".join(f"{s:.1f}s" for s in result["training_again"])
            if result.get("training_again")
            else ""
        ),
        flush=True,
    )


def run_local(
    args: argparse.Namespace, arms: tuple[str, ...], every: dict[str, float]
) -> dict[str, list[dict[str, Any]]]:
    """The arms through `spotrun run`, each repetition's faults from one seed."""
    clocks = [f"--{kind}-every={seconds:g}s" for kind, seconds in every.items()]
    if args.random_intervals:
        clocks.append("--random-intervals")
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="spotrun-goodput-") as tmp:
        folder = Path(tmp)
        jobs = {
            "warm": job_file(folder, "Warm", args.steps),
            "cold": job_file(folder, "Cold", args.steps),
        }
        jobs["spare"] = jobs["away-fixed"] = jobs["warm"]
        jobs["away-elastic"] = job_file(folder, "Warm", args.steps, elastic=True)
        jobs["pool"] = job_file(folder, "Warm", args.steps, spares=args.spares)
        for rep in range(args.repeat):
            order = list(arms) if rep % 2 == 0 else list(reversed(arms))
            for arm in order:
                storage = folder / f"{arm}-{rep}"
                faults = [] if arm == "fault-free" else [*clocks, "--seed", str(1000 + rep)]
                if arm == "spare":
                    faults += ["--spares", str(args.spares)]
                if arm.startswith("away-"):
                    faults += [f"--unavailable-for={args.unavailable_for:g}s"]
                job = jobs["warm" if arm == "fault-free" else arm]
                result = run_once(job, storage, faults, args.timeout)
                results[arm].append(result)
                print_run(rep, arm, result)
    return results


def report(
    args: argparse.Namespace, arms: tuple[str, ...], results: dict[str, list[dict[str, Any]]]
) -> None:
    base = statistics.median(r["wall"] for r in results["fault-free"])
    print()
    spacing = "exponential intervals" if args.random_intervals else "exact intervals"
    where = "the real node (TrainJobs under the operator)" if args.real_node else "local mode"
    print(
        f"{where}: fault every {args.every:g}s of training on average ({args.faults}, "
        f"{spacing}), {args.repeat} repetition(s), medians"
    )
    print(
        f"{'arm':>10}  {'wall':>8}  {'goodput':>8}  {'interruptions':>13}  {'recovery (median)':>17}"
    )
    for arm in arms:
        wall = statistics.median(r["wall"] for r in results[arm])
        recover = [s for r in results[arm] for s in r["recover_seconds"]]
        interrupted = statistics.median(r["interruptions"] for r in results[arm])
        print(
            f"{arm:>10}  {wall:7.1f}s  {base / wall:8.3f}  {interrupted:13g}  "
            + (f"{statistics.median(recover):16.2f}s" if recover else f"{'-':>17}")
        )
    if {"warm", "spare", "cold"} <= set(arms):
        warm = statistics.median(r["wall"] for r in results["warm"])
        spare = statistics.median(r["wall"] for r in results["spare"])
        cold = statistics.median(r["wall"] for r in results["cold"])
        print(
            f"\nwarm goodput {base / warm:.3f}, with {args.spares} spare(s) {base / spare:.3f}, "
            f"cold {base / cold:.3f}: warm/cold wall ratio {warm / cold:.3f}, "
            f"spare/warm {spare / warm:.3f}"
        )
    if {"warm", "pool"} <= set(arms):
        warm = statistics.median(r["wall"] for r in results["warm"])
        pool = statistics.median(r["wall"] for r in results["pool"])
        print(
            f"spec.spares {args.spares}: goodput {base / pool:.3f} against warm {base / warm:.3f}: "
            f"pool/warm wall ratio {pool / warm:.3f}"
        )
    if {"away-fixed", "away-elastic"} <= set(arms):
        fixed = statistics.median(r["wall"] for r in results["away-fixed"])
        elastic = statistics.median(r["wall"] for r in results["away-elastic"])
        print(
            f"capacity away {args.unavailable_for:g}s after each fault: goodput elastic "
            f"{base / elastic:.3f}, fixed size {base / fixed:.3f}: elastic/fixed wall ratio "
            f"{elastic / fixed:.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
