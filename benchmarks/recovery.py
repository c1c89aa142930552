"""Recovery benchmark: from a pod's loss to every rank training again, phase by phase.

On the real node of `hack/cluster up --real-node` (a kubelet on containerd, see
docs/cluster.md), a TrainJob of 2 replicas x 1 gloo worker runs
benchmarks/recovery_workload.py (examples.train_linear's train_func_steps with timestamps;
a ConfigMap in the pods of the node's examples image) under the operator, in its own process. Each run kills the
pod of node rank 1 (status.group.members[1]) and times the way back:

  detect              loss -> the operator records the interruption (status.interruptions[].time)
  decide              -> it restarts the group (interruptions[].restartTime): the old
                        attempt's pods must be gone first, then the restart backoff
  pods created        -> the last pod of the new attempt is created (seen by a watch)
  containers started  -> the last trainer container runs (seen by a watch)
  imports             -> python is up with torch and spotrun imported (last rank)
  rendezvous          -> every rank joined the process group (gloo, via CoreDNS)
  checkpoint loaded   -> every rank read and verified the checkpoint to resume from
  first step          -> every rank reported its first training step: training again (DDP's
                        construction, a collective, imports torch._dynamo in a fresh process)

Three arms, in one invocation (--arms): `cold` (spec.recovery: Cold, the whole group restarted),
`warm` (the survivor kept, only the lost pod replaced) and `spare` (warm with spec.spares: 1: a
waiting pod takes the lost member's place, and the lost pod's replacement waits as the next
spare, ready before the next kill). A promoted spare's pod was created and started before the
loss, so the spare arm has no "pods created" or "containers started" phase: those two count
only new pods that are members of the new attempt's group.

The loss is without notice by default (every process of the trainer container SIGKILLed
through containerd, then the pod force-deleted, as when a node vanishes); --notice deletes
the pod gracefully instead (SIGTERM: the runtime commits a final checkpoint first).
Prints each run and the median of each phase.

    .venv/bin/python benchmarks/recovery.py --runs 5
    .venv/bin/python benchmarks/recovery.py --run-dir ~/.cache/spotrun/run/cluster  # running cluster
    .venv/bin/python benchmarks/recovery.py --arms warm,spare --ballast-mb 512
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from spotrun.local.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
HACK_CLUSTER = ROOT / "hack" / "cluster"
GROUP, VERSION, PLURAL = "spotrun.dev", "v1alpha1", "trainjobs"
JOB = "recovery"
WORKLOAD = ROOT / "benchmarks" / "recovery_workload.py"
WORKLOAD_CONFIGMAP = "recovery-workload"
ATTEMPT_LABEL = "spotrun.dev/attempt"
REPLICAS = 2  # examples/trainjob.yaml's
# What a waiting spare's worker logs once its imports are done (train/_function_worker.py).
SPARE_READY = "ready, waiting to be promoted into a group"
ARMS = {"cold": ("Cold", 0), "warm": ("Warm", 0), "spare": ("Warm", 1)}  # recovery, spares
MARK = re.compile(r"^\[recovery-mark\] (\S+) (\d+\.\d+) (\d+)$", re.M)
PHASES = (
    "detect",
    "decide",
    "pods created",
    "containers started",
    "imports",
    "rendezvous",
    "checkpoint loaded",
    "first step",
)


def log(msg: str) -> None:
    print(f"recovery: {msg}", file=sys.stderr, flush=True)


def hack_cluster(*args: str) -> str:
    proc = subprocess.run(
        [str(HACK_CLUSTER), *args], capture_output=True, text=True, timeout=1800, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"hack/cluster {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


TRANSFER = re.compile(r"state of step \d+ from rank \d+'s memory in ([0-9.]+)s \((\d+) bytes\)")

# A raw TCP copy of N bytes from pod 0 to pod 1, the baseline of the peer transfer.
RAW_SERVER = """
import socket, sys, time
n = int(sys.argv[1]); s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 29999)); s.listen(1); c, _ = s.accept(); buf = bytearray(8 << 20); left = n
t = time.monotonic()
while left:
    k = c.recv_into(buf, min(left, len(buf)))
    if not k: break
    left -= k
print(f"{time.monotonic() - t:.6f}")
"""
RAW_CLIENT = """
import socket, sys, time
host, n = sys.argv[1], int(sys.argv[2]); data = bytes(8 << 20)
for _ in range(100):
    try:
        c = socket.create_connection((host, 29999)); break
    except OSError:
        time.sleep(0.1)
left = n
while left:
    left -= c.send(memoryview(data)[: min(left, len(data))])
c.close()
"""


class Bench:
    name = JOB  # the TrainJob's name in the bench's namespace

    def __init__(
        self,
        run_dir: Path,
        namespace: str,
        notice: bool,
        grace: int,
        recovery: str = "Warm",
        ballast_mb: int = 0,
        spares: int = 0,
    ) -> None:
        self.recovery = recovery
        self.spares = spares
        self.ballast_mb = ballast_mb
        self.run_dir = run_dir
        state = json.loads((run_dir / "state.json").read_text())
        self.kubeconfig = str(run_dir / "kubeconfig")
        self.gcs = f"http://10.88.0.1:{state['ports']['fake-gcs-server']}"
        self.socket = str(run_dir / "node" / "containerd" / "containerd.sock")
        self.kubectl_bin = hack_cluster("bin", "kubectl").strip()
        self.namespace = namespace
        self.notice = notice
        self.grace = grace
        self.seen: dict[str, dict[str, Any]] = {}  # pod uid -> name, attempt, added, running
        self._stop = threading.Event()
        self.operator: subprocess.Popen[bytes] | None = None

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(
            [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def status(self) -> dict[str, Any]:
        out = self.kubectl("get", "trainjob", self.name, "-n", self.namespace, "-o", "json")
        status: dict[str, Any] = json.loads(out).get("status") or {}
        return status

    # -- set-up ------------------------------------------------------------------------------

    def start(self) -> None:
        self.prepare()
        self.submit()

    def prepare(self) -> None:
        """The CRD, the namespace and its workload, and an operator for it, ready to serve."""
        self.kubectl(
            "apply", "--server-side", "-f", str(ROOT / "crds" / "trainjobs.spotrun.dev.yaml")
        )
        self.kubectl("wait", "--for=condition=Established", "crd/trainjobs.spotrun.dev")
        self.kubectl("create", "namespace", self.namespace)
        deadline = time.monotonic() + 60
        while not self.kubectl("get", "sa", "default", "-n", self.namespace, check=False):
            if time.monotonic() > deadline:
                raise RuntimeError("no default ServiceAccount")
            time.sleep(0.5)
        self.kubectl(
            *("create", "configmap", WORKLOAD_CONFIGMAP, "-n", self.namespace),
            f"--from-file={WORKLOAD.name}={WORKLOAD}",
        )
        health = f"http://127.0.0.1:{free_port()}/healthz"
        log_path = Path(tempfile.gettempdir()) / f"recovery-operator-{self.namespace}.log"
        with open(log_path, "wb") as out:
            self.operator = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "spotrun_operator",
                    f"--namespace={self.namespace}",
                    "--metrics-address=127.0.0.1:0",
                    "--log-format=json",
                    "--resync-seconds=15",
                    f"--liveness={health}",
                ],
                cwd=ROOT,
                env={**os.environ, "KUBECONFIG": self.kubeconfig},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        log(f"operator log: {log_path}")
        threading.Thread(target=self._watch, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(health, timeout=2):
                    break
            except OSError as err:
                if self.operator.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the operator is not serving ({err}); see {log_path}"
                    ) from err
                time.sleep(0.2)

    def submit(self) -> None:
        """Creates the TrainJob."""
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input=json.dumps(self.job()))

    def demo_body(self) -> dict[str, Any]:
        """examples/trainjob.yaml named for this bench, with its recovery and spares."""
        body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "trainjob.yaml").read_text())
        body["metadata"] = {"name": self.name}
        body["spec"]["recovery"] = self.recovery
        if self.spares:
            body["spec"]["spares"] = self.spares
        return body

    def on_node(self, body: dict[str, Any]) -> dict[str, Any]:
        """BODY on the node's examples image, its checkpoints in this namespace's bucket."""
        sys.path.insert(0, str(ROOT / "hack"))
        from clusterlib.dev_node_job import dev_node_job

        result: dict[str, Any] = dev_node_job(
            body, storage=f"gs://spotrun/{self.namespace}", gcs_endpoint=self.gcs
        )
        return result

    def job(self) -> dict[str, Any]:
        body = self.demo_body()
        spec = body["spec"]
        spec["config"] = {
            "steps": 10**7,
            "step_seconds": 0.05,
            "checkpoint_every": 20,
            "seed": 0,
            "ballast_mb": self.ballast_mb,
        }
        spec["trainer"].pop("function", None)
        # The examples image runs the workload from a ConfigMap (no host path in any pod);
        # `examples` is imported from the image's /workspace.
        spec["trainer"]["command"] = ["python", f"/bench/{WORKLOAD.name}"]
        spec["trainer"]["env"] = [
            {"name": "PYTHONPATH", "value": "/workspace"},
        ]
        spec["template"] = {
            "spec": {
                "terminationGracePeriodSeconds": self.grace,
                "volumes": [{"name": "bench", "configMap": {"name": WORKLOAD_CONFIGMAP}}],
                "containers": [
                    {
                        "name": "trainer",
                        "volumeMounts": [
                            {"name": "bench", "mountPath": "/bench", "readOnly": True}
                        ],
                    }
                ],
            }
        }
        spec["failurePolicy"]["maxFailures"] = 100
        return self.on_node(body)

    def _watch(self) -> None:
        """Records when each pod is first seen and when its container is first running."""
        from kubernetes import client, config, watch

        api = client.CoreV1Api(config.new_client_from_config(config_file=self.kubeconfig))
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(
                    api.list_namespaced_pod, self.namespace, timeout_seconds=30
                ):
                    now = time.time()
                    pod = event["object"]
                    uid = pod.metadata.uid
                    rec = self.seen.setdefault(
                        uid,
                        {
                            "name": pod.metadata.name,
                            "attempt": int((pod.metadata.labels or {}).get(ATTEMPT_LABEL, -1)),
                            "added": now,
                        },
                    )
                    statuses = pod.status.container_statuses or []
                    if "running" not in rec and statuses and statuses[0].state.running:
                        rec["running"] = now
                    if self._stop.is_set():
                        return
            except Exception as err:  # a dropped watch: start another
                log(f"pod watch: {err}")
                time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()
        self.kubectl(
            "delete", "trainjob", self.name, "-n", self.namespace, "--wait=true", check=False
        )
        if self.operator is not None and self.operator.poll() is None:
            self.operator.terminate()
            self.operator.wait(30)
        self.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)

    # -- one run -----------------------------------------------------------------------------

    def pods(self) -> list[str]:
        """The job's pods now (members and waiting spares), by name."""
        out = self.kubectl(
            *("get", "pods", "-n", self.namespace, "-l", f"spotrun.dev/job={self.name}"),
            *("-o", "jsonpath={.items[*].metadata.name}"),
            check=False,
        )
        return sorted(out.split())

    def members(self, status: dict[str, Any] | None = None) -> list[str]:
        """The pods of the current group, in node-rank order (status.group.members)."""
        status = self.status() if status is None else status
        group = status.get("group") or {}
        ordinals = group.get("members") or range(int(group.get("replicas") or REPLICAS))
        return [f"{self.name}-{i}" for i in ordinals]

    def marks(self, attempt: int) -> dict[str, dict[str, float]]:
        """pod -> mark -> time, from the trainer logs of ATTEMPT (whichever pods ran it)."""
        out: dict[str, dict[str, float]] = {}
        for pod in self.pods():
            text = self.kubectl("logs", pod, "-n", self.namespace, check=False)
            for name, when, att in MARK.findall(text):
                if int(att) == attempt:  # a mark's first line counts
                    out.setdefault(pod, {}).setdefault(name, float(when))
        return out

    def wait_training(self, attempt: int, timeout: float = 300) -> dict[str, dict[str, float]]:
        deadline = time.monotonic() + timeout
        while True:
            marks = self.marks(attempt)
            if len(marks) == REPLICAS and all("first_step" in m for m in marks.values()):
                return marks
            if time.monotonic() > deadline:
                raise RuntimeError(f"attempt {attempt} did not train within {timeout:.0f}s")
            time.sleep(0.5)

    def wait_attempt(self, after: int, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while True:
            attempt = int(self.status().get("attempt", 0))
            if attempt > after and self.status().get("state") in ("Running", "Restarting"):
                return attempt
            if time.monotonic() > deadline:
                raise RuntimeError(f"no attempt after {after} within {timeout:.0f}s")
            time.sleep(0.2)

    def wait_spares_ready(self, timeout: float = 300) -> None:
        """Every pod outside the group runs and its workers wait, imports done, to be promoted."""
        deadline = time.monotonic() + timeout
        while self.spares:
            members = set(self.members())
            waiting = [p for p in self.pods() if p not in members]
            ready = [
                p
                for p in waiting
                if SPARE_READY in self.kubectl("logs", p, "-n", self.namespace, check=False)
            ]
            if len(ready) >= self.spares:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no ready spare within {timeout:.0f}s (waiting: {waiting})")
            time.sleep(0.5)

    def interrupt(self, pod: str | None = None, notice: bool | None = None) -> float:
        """Takes POD (default: node rank 1's) away, with notice or without; when it began."""
        pod = self.members()[1] if pod is None else pod
        if self.notice if notice is None else notice:
            t0 = time.time()
            self.kubectl("delete", "pod", pod, "-n", self.namespace, "--wait=false")
            return t0
        obj = json.loads(self.kubectl("get", "pod", pod, "-n", self.namespace, "-o", "json"))
        container = obj["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
        t0 = time.time()
        subprocess.run(
            [
                *("ctr", f"--address={self.socket}", "--namespace=k8s.io"),
                *("tasks", "kill", "--all", "--signal=SIGKILL", container),
            ],
            check=True,
            capture_output=True,
        )
        self.kubectl(
            "delete",
            "pod",
            pod,
            "-n",
            self.namespace,
            "--grace-period=0",
            "--force",
            "--wait=false",
        )
        return t0

    def run_once(self) -> dict[str, float]:
        attempt = self.wait_attempt(0)
        self.wait_training(attempt)
        time.sleep(3)  # train a little: a checkpoint or two
        self.wait_spares_ready()
        t0 = self.interrupt()
        new = self.wait_attempt(attempt)
        marks = self.wait_training(new)
        status = self.status()
        event = next(i for i in reversed(status["interruptions"]) if i["attempt"] == attempt)
        members = self.members(status)

        def new_members() -> list[dict[str, Any]]:
            # Pods created for the new attempt that are in its group (not the next spare).
            return [r for r in self.seen.values() if r["attempt"] == new and r["name"] in members]

        fresh = len(members) - sum(1 for p in members if p in self.kept_names(status))
        deadline = time.monotonic() + 10
        while (
            len(pods := new_members()) < fresh or not all("running" in p for p in pods)
        ) and time.monotonic() < deadline:
            time.sleep(0.2)
        points = [("detect", ts(event["time"])), ("decide", ts(event["restartTime"]))]
        if pods:
            points += [
                ("pods created", max(p["added"] for p in pods)),
                ("containers started", max(p["running"] for p in pods if "running" in p)),
            ]
        points += [
            ("imports", max(m["imported"] for m in marks.values())),
            ("rendezvous", max(m["rendezvous"] for m in marks.values())),
            ("checkpoint loaded", max(m["checkpoint_loaded"] for m in marks.values())),
            ("first step", max(m["first_step"] for m in marks.values())),
        ]
        phases: dict[str, float] = {}
        last = t0
        for name, when in points:
            # Status times have millisecond resolution and come from another clock reading;
            # a phase never counts negative.
            phases[name] = max(0.0, when - last)
            last = max(last, when)
        phases["total"] = last - t0
        for pod, times in sorted(marks.items()):
            shown = ", ".join(
                f"{k} +{v - t0:.2f}" for k, v in sorted(times.items(), key=lambda x: x[1])
            )
            log(f"  {pod}: {shown}")
        deadline = time.monotonic() + 30
        while "stepsLost" not in event and time.monotonic() < deadline:
            time.sleep(0.5)  # a warm recovery's steps lost come with restoredFrom
            status = self.status()
            event = next(i for i in reversed(status["interruptions"]) if i["attempt"] == attempt)
        phases["steps lost"] = float(event.get("stepsLost", -1))
        phases["from memory"] = (
            1.0 if (status.get("restoredFrom") or {}).get("tier") == "memory" else 0.0
        )
        phases["pods replaced"] = float(len(pods))
        log_text = "".join(
            self.kubectl("logs", pod, "-n", self.namespace, check=False) for pod in members
        )
        moved = TRANSFER.findall(log_text)
        if moved and int(moved[-1][1]) >= 1 << 20:
            # Throughput only for a state worth timing: a few KiB move in under the 10 ms
            # the log's two decimals can show.
            seconds, size = float(moved[-1][0]), int(moved[-1][1])
            phases["peer MB/s"] = size / max(seconds, 1e-9) / 1e6
            phases["raw MB/s"] = self.raw_copy(size, *members[:2])
        return phases

    def kept_names(self, status: dict[str, Any]) -> set[str]:
        """The pods the last warm restart kept (survivors and waiting spares)."""
        return {f"{self.name}-{i}" for i in (status.get("group") or {}).get("kept") or ()}

    def raw_copy(self, size: int, receiver: str, sender: str) -> float:
        """MB/s of a plain TCP copy of `size` bytes from SENDER's pod to RECEIVER's."""
        ip = json.loads(self.kubectl("get", "pod", receiver, "-n", self.namespace, "-o", "json"))[
            "status"
        ]["podIP"]
        server = subprocess.Popen(
            [
                self.kubectl_bin,
                f"--kubeconfig={self.kubeconfig}",
                *("exec", "-n", self.namespace, receiver, "-c", "trainer", "--"),
                *("python", "-c", RAW_SERVER, str(size)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)
        self.kubectl(
            *("exec", "-n", self.namespace, sender, "-c", "trainer", "--"),
            *("python", "-c", RAW_CLIENT, ip, str(size)),
        )
        out, _ = server.communicate(timeout=120)
        return size / max(float(out.strip().splitlines()[-1]), 1e-9) / 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="a running `hack/cluster up --real-node` cluster (default: start one, stop it after)",
    )
    parser.add_argument("--notice", action="store_true", help="graceful pod deletion (SIGTERM)")
    parser.add_argument(
        "--grace", type=int, default=15, help="the pods' terminationGracePeriodSeconds (15)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the runs here")
    parser.add_argument(
        "--arms",
        default="cold,warm,spare",
        help="comma-separated, run in this order: cold (spec.recovery: Cold), warm "
        "(Warm), spare (Warm with spec.spares: 1); default cold,warm,spare",
    )
    parser.add_argument(
        "--ballast-mb", type=int, default=0, help="MiB of extra state in every checkpoint"
    )
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"--arms: unknown {unknown} (choose from {', '.join(ARMS)})")

    own = args.run_dir is None
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="recovery-cluster-"))
    if own:
        log(f"starting a cluster with a real node in {run_dir}")
        hack_cluster("up", "--real-node", f"--run-dir={run_dir}")
    results: dict[str, list[dict[str, float]]] = {}
    try:
        for arm in arms:
            recovery, spares = ARMS[arm]
            bench = Bench(
                run_dir,
                f"recovery-{arm}-{uuid.uuid4().hex[:6]}",
                args.notice,
                args.grace,
                recovery=recovery,
                ballast_mb=args.ballast_mb,
                spares=spares,
            )
            runs: list[dict[str, float]] = results.setdefault(arm, [])
            try:
                bench.start()
                for i in range(args.runs):
                    phases = bench.run_once()
                    runs.append(phases)
                    log(f"{arm} run {i + 1}/{args.runs}: total {phases['total']:.2f}s")
            finally:
                bench.stop()
    finally:
        if own:
            hack_cluster("down", f"--run-dir={run_dir}")

    kind = "graceful delete (notice)" if args.notice else "SIGKILL + force delete (no notice)"
    for arm, runs in results.items():
        recovery, spares = ARMS[arm]
        print(
            f"\nrecovery of a {REPLICAS}-replica TrainJob on the real node, {kind}, arm {arm} "
            f"(recovery {recovery}, {spares} spare(s)), {args.ballast_mb} MiB ballast, "
            f"{len(runs)} runs"
        )
        header = f"{'phase':20}" + "".join(f"{f'run {i + 1}':>9}" for i in range(len(runs)))
        print(header + f"{'median':>9}")
        names = [
            *PHASES,
            *("total", "steps lost", "from memory", "pods replaced", "peer MB/s", "raw MB/s"),
        ]
        for name in names:
            values = [r[name] for r in runs if name in r]
            if not values:
                continue
            cells = "".join(f"{v:9.2f}" for v in values)
            print(f"{name:20}{cells}{statistics.median(values):9.2f}")
    medians = {arm: statistics.median(r["total"] for r in runs) for arm, runs in results.items()}
    if medians:
        print("\nmedian total: " + ", ".join(f"{a} {m:.2f}s" for a, m in medians.items()))
    base = medians.get("cold")
    for arm, median in medians.items():
        if base and arm != "cold":
            print(f"{arm}/cold {median / base:.3f}")
    if "warm" in medians and "spare" in medians:
        print(f"spare/warm {medians['spare'] / medians['warm']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
