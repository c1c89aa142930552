#!/usr/bin/env python3
"""How the operator scales: N TrainJobs of 4 replicas each on KWOK nodes.

Measures, against a real control plane (hack/cluster: etcd, kube-apiserver, controllers,
scheduler, KWOK) and the operator running as in production (`python -m spotrun_operator`):

- the time from the first TrainJob created until all N are Running (and each job's own
  time from creation to Running, p50/p99);
- after a pod of K running jobs is deleted (a preemption), the time until the group's new
  pods (all replicas of the next attempt) exist, p50 and p99;
- the operator's peak resident memory (VmHWM) and CPU time.

Usage:
  .venv/bin/python benchmarks/operator_scale.py                 # 500 jobs, own cluster
  .venv/bin/python benchmarks/operator_scale.py --jobs 100      # fewer
  .venv/bin/python benchmarks/operator_scale.py --kubeconfig K  # an existing KWOK cluster

Without --kubeconfig it starts a cluster with `hack/cluster up` in a temporary directory
and stops it at the end. Every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from spotrun.local.ports import free_port

REPO = Path(__file__).resolve().parents[1]
HACK_CLUSTER = REPO / "hack" / "cluster"
CRD = REPO / "crds" / "trainjobs.spotrun.dev.yaml"
GROUP, VERSION, PLURAL = "spotrun.dev", "v1alpha1", "trainjobs"
NAMESPACE = "spotrun-bench"
POOL_LABEL = "spotrun.bench/pool"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def hack(*args: str) -> str:
    proc = subprocess.run([str(HACK_CLUSTER), *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"hack/cluster {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")
    return proc.stdout


@contextmanager
def cluster(kubeconfig: str | None) -> Iterator[tuple[str, str | None]]:
    """(kubeconfig, run dir): an existing cluster, or one started here and stopped after."""
    if kubeconfig:
        yield kubeconfig, os.environ.get("SPOTRUN_BENCH_RUN_DIR")
        return
    run_dir = tempfile.mkdtemp(prefix="spotrun-bench-")
    try:
        out = hack("up", "--nodes=0", f"--run-dir={run_dir}")
        found = re.search(r"^export KUBECONFIG=(\S+)$", out, re.M)
        if not found:
            raise SystemExit(f"hack/cluster up printed no KUBECONFIG:\n{out}")
        yield found.group(1), run_dir
    finally:
        hack("down", f"--run-dir={run_dir}")


@contextmanager
def operator_process(
    kubeconfig: str, log_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    metrics_port, probe_port = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spotrun_operator",
                f"--namespace={NAMESPACE}",
                f"--metrics-address=127.0.0.1:{metrics_port}",
                f"--liveness=http://127.0.0.1:{probe_port}/healthz",
                "--log-format=json",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the operator exited with {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{probe_port}/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"the operator did not answer its probe; see {log_path}"
                    ) from None
                time.sleep(0.5)
        yield proc, metrics_port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def trainjob(name: str, replicas: int, backoff: float) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "trainer": {
                "image": "registry.k8s.io/pause:3.10",
                "function": "examples.train_linear:train",
                "resources": {"limits": {"nvidia.com/gpu": "1"}},
            },
            "checkpoint": {"storage": "gs://spotrun-bench/runs"},
            "failurePolicy": {
                "backoff": {"initialSeconds": backoff, "maxSeconds": max(backoff, 1), "jitter": 0}
            },
            "template": {
                "spec": {"nodeSelector": {POOL_LABEL: "bench", "cloud.google.com/gke-spot": "true"}}
            },
        },
    }


class Watcher(threading.Thread):
    """Follows the namespace's TrainJobs and pods and timestamps what the benchmark waits for."""

    def __init__(self, api: client.ApiClient, replicas: int) -> None:
        super().__init__(daemon=True)
        self.api = api
        self.replicas = replicas
        self.lock = threading.Condition()
        self.running_at: dict[str, float] = {}
        self.pods: dict[str, tuple[str, str, bool]] = {}  # name -> (job, attempt, deleting)
        self.awaiting: dict[str, tuple[float, str]] = {}  # job -> (deleted at, attempt)
        self.recovered: dict[str, float] = {}  # job -> seconds from deletion to new pods
        self.deleted_at: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._follow, args=(self._jobs,), daemon=True),
            threading.Thread(target=self._follow, args=(self._pods,), daemon=True),
        ]
        for t in threads:
            t.start()
        self.stop.wait()

    def _follow(self, kind: Any) -> None:
        while not self.stop.is_set():
            try:
                kind()
            except Exception as err:  # a watch ended (or the cluster is going away): resume
                if self.stop.is_set():
                    return
                log(f"watch restarted after {type(err).__name__}")
                time.sleep(1)

    def _jobs(self) -> None:
        custom = client.CustomObjectsApi(self.api)
        for event in watch.Watch().stream(
            custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            NAMESPACE,
            PLURAL,
            timeout_seconds=60,
        ):
            obj = event["object"]
            name = obj["metadata"]["name"]
            if (obj.get("status") or {}).get("state") == "Running":
                with self.lock:
                    self.running_at.setdefault(name, time.time())
                    self.lock.notify_all()

    def _pods(self) -> None:
        core = client.CoreV1Api(self.api)
        for event in watch.Watch().stream(
            core.list_namespaced_pod,
            NAMESPACE,
            label_selector="spotrun.dev/job",
            timeout_seconds=60,
            _preload_content=True,
        ):
            pod = event["object"]
            labels = pod.metadata.labels or {}
            name, job = pod.metadata.name, labels.get("spotrun.dev/job", "")
            with self.lock:
                if event["type"] == "DELETED":
                    self.pods.pop(name, None)
                else:
                    deleting = pod.metadata.deletion_timestamp is not None
                    self.pods[name] = (job, labels.get("spotrun.dev/attempt", ""), deleting)
                self._check(job)
                self.lock.notify_all()

    def _check(self, job: str) -> None:
        pending = self.awaiting.get(job)
        if pending is None:
            return
        since, attempt = pending
        new = [p for p in self.pods.values() if p[0] == job and p[1] == attempt and not p[2]]
        if len(new) >= self.replicas:
            self.recovered[job] = time.time() - since
            del self.awaiting[job]

    def expect_restart(self, job: str, attempt: int) -> None:
        with self.lock:
            self.awaiting[job] = (time.time(), str(attempt))
            self.deleted_at[job] = self.awaiting[job][0]

    def wait(self, what: str, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
                self.lock.wait(min(left, 5))


def parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of a live process, from /proc."""
    peak = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return peak, (int(fields[11]) + int(fields[12])) / ticks


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", type=int, default=500, help="TrainJobs to create (default 500)")
    p.add_argument("--replicas", type=int, default=4, help="pods per TrainJob (default 4)")
    p.add_argument(
        "--restarts", type=int, default=None, help="jobs to preempt (default: min(50, jobs))"
    )
    p.add_argument(
        "--gpus-per-node", type=int, default=32, help="GPUs of each KWOK node (default 32)"
    )
    p.add_argument("--backoff-seconds", type=float, default=0.0, help="the jobs' restart backoff")
    p.add_argument("--kubeconfig", help="use this KWOK cluster instead of starting one")
    p.add_argument("--timeout", type=float, default=900, help="give up after this long per phase")
    args = p.parse_args(argv)
    restarts = min(args.jobs, 50) if args.restarts is None else min(args.restarts, args.jobs)
    pods_total = args.jobs * args.replicas
    nodes = max(1, math.ceil(pods_total / min(args.gpus_per_node, 100)))

    with cluster(args.kubeconfig) as (kubeconfig, run_dir), tempfile.TemporaryDirectory() as tmp:
        kubectl = hack("bin", "kubectl").strip()
        env = {**os.environ, "KUBECONFIG": kubeconfig}
        subprocess.run(
            [kubectl, "apply", "--server-side", "--force-conflicts", "-f", str(CRD)],
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [kubectl, "wait", "--for=condition=Established", "crd/trainjobs.spotrun.dev"],
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [kubectl, "create", "namespace", NAMESPACE], env=env, check=False, capture_output=True
        )
        log(f"adding {nodes} KWOK nodes with {args.gpus_per_node} GPUs each")
        run_dir_args = [f"--run-dir={run_dir}"] if run_dir else []
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda i: hack(
                        "add-node",
                        f"bench-{i:04d}",
                        f"--gpus={args.gpus_per_node}",
                        f"--label={POOL_LABEL}=bench",
                        *run_dir_args,
                    ),
                    range(nodes),
                )
            )
        api = config.new_client_from_config(config_file=kubeconfig)
        watcher = Watcher(api, args.replicas)
        watcher.start()
        time.sleep(1)

        with operator_process(kubeconfig, Path(tmp) / "operator.log") as (proc, metrics_port):
            log(f"creating {args.jobs} TrainJobs of {args.replicas} replicas ({pods_total} pods)")
            custom = client.CustomObjectsApi(api)
            names = [f"job-{i:04d}" for i in range(args.jobs)]
            created_at: dict[str, float] = {}
            started = time.time()

            def submit(name: str) -> None:
                created_at[name] = time.time()
                custom.create_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    NAMESPACE,
                    PLURAL,
                    trainjob(name, args.replicas, args.backoff_seconds),
                )

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(submit, names))
            submitted = time.time() - started
            watcher.wait(
                f"{args.jobs} TrainJobs Running",
                lambda: len(watcher.running_at) >= args.jobs,
                args.timeout,
            )
            all_running = max(watcher.running_at.values()) - started
            per_job = [watcher.running_at[n] - created_at[n] for n in names]
            log(f"all {args.jobs} Running after {all_running:.1f}s")

            core = client.CoreV1Api(api)
            victims = names[:: max(1, args.jobs // restarts)][:restarts]
            log(f"deleting one pod of {len(victims)} running jobs")
            for i, name in enumerate(victims):
                watcher.expect_restart(name, 2)
                core.delete_namespaced_pod(f"{name}-{i % args.replicas}", NAMESPACE)
                time.sleep(0.1)
            watcher.wait(
                f"{len(victims)} groups to get their new pods",
                lambda: len(watcher.recovered) >= len(victims),
                args.timeout,
            )
            recovery = list(watcher.recovered.values())
            seen, decided = [], []
            for name in victims:
                job = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
                entry = (job.get("status") or {}).get("interruptions", [{}])[-1]
                if "time" in entry and "restartTime" in entry:
                    seen.append(parse_time(entry["time"]) - watcher.deleted_at[name])
                    decided.append(parse_time(entry["restartTime"]) - watcher.deleted_at[name])
            peak_mib, cpu_seconds = proc_stats(proc.pid)
            samples = scrape(metrics_port)

        watcher.stop.set()
        passes = samples.get("spotrun_reconcile_duration_seconds_count", 0.0)
        pass_seconds = samples.get("spotrun_reconcile_duration_seconds_sum", 0.0)
        writes = samples.get('spotrun_status_writes_total{outcome="written"}', 0.0)
        calls = sum(v for k, v in samples.items() if k.startswith("spotrun_api_calls_total{"))
        print()
        print(
            f"operator scale: {args.jobs} TrainJobs x {args.replicas} replicas = {pods_total} pods on {nodes} KWOK nodes ({os.cpu_count()} CPUs)"
        )
        print(f"  submit {args.jobs} TrainJobs:             {submitted:8.1f} s")
        print(f"  all Running (from first create):        {all_running:8.1f} s")
        print(
            f"  per job, create -> Running:     p50 {percentile(per_job, 50):6.1f} s   p99 {percentile(per_job, 99):6.1f} s"
        )
        print(
            f"  pod deleted -> new group's pods exist ({len(recovery)} jobs, backoff {args.backoff_seconds:g}s):"
        )
        print(
            f"                                  p50 {percentile(recovery, 50):6.2f} s   p99 {percentile(recovery, 99):6.2f} s   max {max(recovery):6.2f} s"
        )
        print(
            f"    of which: loss seen by the operator   p50 {percentile(seen, 50):6.2f} s   "
            f"p99 {percentile(seen, 99):6.2f} s"
        )
        print(
            f"              restart decided (drain)    p50 {percentile(decided, 50):6.2f} s   "
            f"p99 {percentile(decided, 99):6.2f} s"
        )
        print(f"  operator peak RSS (VmHWM):              {peak_mib:8.1f} MiB")
        print(f"  operator CPU time:                      {cpu_seconds:8.1f} s")
        print(
            f"  reconcile passes: {passes:.0f} (mean {1000 * pass_seconds / max(passes, 1):.1f} ms), status writes: {writes:.0f}, API calls: {calls:.0f}"
        )
        print(
            json.dumps(
                {
                    "jobs": args.jobs,
                    "replicas": args.replicas,
                    "nodes": nodes,
                    "all_running_s": round(all_running, 2),
                    "create_to_running_p50_s": round(percentile(per_job, 50), 2),
                    "create_to_running_p99_s": round(percentile(per_job, 99), 2),
                    "recovery_p50_s": round(percentile(recovery, 50), 3),
                    "recovery_p99_s": round(percentile(recovery, 99), 3),
                    "loss_seen_p50_s": round(percentile(seen, 50), 3),
                    "restart_decided_p50_s": round(percentile(decided, 50), 3),
                    "operator_peak_rss_mib": round(peak_mib, 1),
                    "operator_cpu_s": round(cpu_seconds, 1),
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
