"""The real-node arms of benchmarks/goodput.py: the demo job under the operator, on a kubelet.

`benchmarks/goodput.py --real-node` runs examples/trainjob.yaml's demo job (its function,
config and policy; only the image and the bucket are the dev node's, as hack/dev-node-job
sets them) as a TrainJob on the real node of `hack/cluster up --real-node`, one namespace and
one operator per run, and injects the faults itself, the way `spotrun run` does locally:

- the clocks are FaultSchedule's (spotrun.local.faults): seconds of training, seeded, the
  same exact or exponential intervals, staggered kinds;
- a second of training counts while the TrainJob is Running and its attempt has reported
  progress (status.lastMetrics changed since the attempt was first seen), at most one
  fault per attempt;
- the victim is a member of the current group (status.group.members), drawn from the seed;
- a preemption deletes its pod gracefully (SIGTERM to the trainer: a final checkpoint, the
  way a node's shutdown reclaims a spot VM); a kill SIGKILLs every process of its trainer
  container through containerd and force-deletes the pod (a node lost without notice);
- the checkpoint cadences' MTBF is what a user's job gets: 3600 s until the first
  interruption, then the job's observed one (status.group.mtbfSeconds); with --mtbf-env
  the faulted arms' trainers get SPOTRUN_MTBF_SECONDS, the faults' mean interval, as
  `spotrun run` sets it for injected faults.

The wall time runs from the TrainJob's creation (the operator already serving) until the
benchmark sees it Succeeded, for the fault-free arm as for the others.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, cast

import recovery  # benchmarks/recovery.py: the real node's TrainJob harness
from spotrun.local.faults import FaultKind, FaultSchedule

# The arms a cluster has: spares are spec.spares (pods by ordinal), the only spares there are.
ARMS = {
    "fault-free": ("Warm", 0),
    "warm": ("Warm", 0),
    "pool": ("Warm", 1),
    "cold": ("Cold", 0),
    # The pool arm's job without faults: what its waiting spares cost a group that loses nothing.
    "idle-pool": ("Warm", 1),
}
# The arms without injected faults.
FAULT_FREE = ("fault-free", "idle-pool")
POLL_SECONDS = 0.2


class NodeJob(recovery.Bench):
    """The demo TrainJob on the real node, with faults injected by seconds of training."""

    name = "goodput"

    def __init__(
        self,
        run_dir: Path,
        namespace: str,
        *,
        recovery_mode: str,
        spares: int,
        steps: int | None,
        mtbf: float | None = None,
        grace: int = 15,
    ) -> None:
        super().__init__(
            run_dir, namespace, notice=False, grace=grace, recovery=recovery_mode, spares=spares
        )
        self.steps = steps
        self.mtbf = mtbf
        self._api: Any = None

    def job(self) -> dict[str, Any]:
        body = self.demo_body()
        spec = body["spec"]
        if self.steps is not None:
            spec["config"]["steps"] = self.steps
        spec["template"] = {"spec": {"terminationGracePeriodSeconds": self.grace}}
        if self.mtbf is not None:
            # What `spotrun run` tells its workers of injected faults: their mean interval,
            # the MTBF of the checkpoint cadences (Young/Daly; 3600 s when unset).
            spec["trainer"]["env"] = [
                *spec["trainer"].get("env", []),
                {"name": "SPOTRUN_MTBF_SECONDS", "value": f"{self.mtbf:g}"},
            ]
        return self.on_node(body)

    def fast_status(self) -> dict[str, Any]:
        """The TrainJob's status through one API client (a kubectl per poll costs a core)."""
        if self._api is None:
            from kubernetes import client, config

            self._api = client.CustomObjectsApi(
                config.new_client_from_config(config_file=self.kubeconfig)
            )
        body = self._api.get_namespaced_custom_object(
            recovery.GROUP, recovery.VERSION, self.namespace, recovery.PLURAL, self.name
        )
        status: dict[str, Any] = body.get("status") or {}
        return status

    def run(self, schedule: FaultSchedule | None, timeout: float) -> dict[str, Any]:
        """Submits the job, injects faults until it succeeds; the wall time and the ledger."""
        started = time.monotonic()
        self.submit()
        first_progress: dict[int, Any] = {}  # attempt -> lastMetrics when first seen
        training: dict[int, float] = {}  # attempt -> when its progress was first seen
        hit: dict[int, float] = {}  # attempt -> when a fault was injected into it
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if now - started > timeout:
                raise RuntimeError(f"{self.namespace}: not done within {timeout:.0f}s")
            try:
                status = self.fast_status()
            except Exception as err:  # the API server busy for a moment: poll again
                recovery.log(f"status: {err}")
                time.sleep(POLL_SECONDS)
                continue
            state = status.get("state")
            if state == "Succeeded":
                wall = time.monotonic() - started
                break
            if state == "Failed":
                raise RuntimeError(f"{self.namespace}: the job failed: {status.get('conditions')}")
            attempt = int(status.get("attempt") or 0)
            metrics = status.get("lastMetrics")
            first_progress.setdefault(attempt, metrics)
            if metrics != first_progress[attempt]:
                training.setdefault(attempt, now)
            elapsed, last = now - last, now
            if (
                schedule is not None
                and state == "Running"
                and attempt in training
                and attempt not in hit
            ):
                schedule.advance(elapsed)
                kind = schedule.due()
                if kind is not None:
                    self.inject(kind, schedule, status, attempt)
                    hit[attempt] = time.monotonic()
            time.sleep(POLL_SECONDS)
        entries = status.get("interruptions") or []
        # From each fault until the benchmark saw the next attempt's progress (written at
        # most once a second, so up to a second late): `spotrun run`'s "training again in".
        back = [
            min(t for a, t in training.items() if a > attempt) - at
            for attempt, at in sorted(hit.items())
            if any(a > attempt for a in training)
        ]
        return {
            "training_again": back,
            "wall": wall,
            "interruptions": int(status.get("preemptions", 0)) + int(status.get("failures", 0)),
            "injected": schedule.injected if schedule is not None else 0,
            "recovery": sorted({str(e.get("recovery", "?")) for e in entries}),
            "steps_lost": sum(int(e.get("stepsLost", 0)) for e in entries),
            "recover_seconds": [
                float(e["secondsToRecover"]) for e in entries if "secondsToRecover" in e
            ],
        }

    def inject(
        self, kind: FaultKind, schedule: FaultSchedule, status: dict[str, Any], attempt: int
    ) -> None:
        group = status.get("group") or {}
        members = list(group.get("members") or range(int(group.get("replicas") or 2)))
        victim = schedule.choose(members)
        schedule.fired(kind)
        pod = f"{self.name}-{victim}"
        recovery.log(f"{self.namespace}: {kind} of {pod} (attempt {attempt})")
        try:
            self.interrupt(pod, notice=kind == "preempt")
        except Exception as err:  # the pod went on its own meanwhile: nothing to take away
            recovery.log(f"{self.namespace}: {kind} of {pod} failed: {err}")


def run_arm(
    run_dir: Path,
    arm: str,
    rep: int,
    every: dict[str, float],
    *,
    random_intervals: bool,
    spares: int,
    steps: int | None,
    timeout: float,
    mtbf_env: bool = False,
) -> dict[str, Any]:
    """One run of ARM on the real node, in a namespace of its own, torn down after."""
    mode, pool = ARMS[arm]
    bench = NodeJob(
        run_dir,
        f"goodput-{arm}-{rep}-{random.randrange(16**6):06x}",
        recovery_mode=mode,
        spares=spares if pool else 0,
        steps=steps,
        # All kinds together (the local supervisor's mtbf_seconds): 1 / the sum of the rates.
        mtbf=None if arm in FAULT_FREE or not mtbf_env else 1 / sum(1 / s for s in every.values()),
    )
    schedule = (
        None
        if arm in FAULT_FREE
        else FaultSchedule(
            every=cast(dict[FaultKind, float], every),
            rng=random.Random(1000 + rep),
            random_intervals=random_intervals,
        )
    )
    try:
        bench.prepare()
        return bench.run(schedule, timeout)
    finally:
        bench.stop()
