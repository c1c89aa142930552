"""Running real spotrun groups from tests: `spotrun launch` with the pod contract set by hand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotrun import contract as pod
from spotrun.ledger.sink import read_status_file, update_status_file
from spotrun.train.writer import WriterConfig
from tests.fixtures.gcs import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = Path(__file__).resolve().parent / "workloads"
# Through the interpreter, so the tests also run where spotrun is on PYTHONPATH rather than
# installed (the GPU machine, with its own torch).
SPOTRUN = [sys.executable, "-m", "spotrun.cli"]
PYTHONPATH = os.pathsep.join([str(ROOT / "runtime"), str(ROOT)])


@dataclass
class Job:
    """One job's storage and name; `run` starts a group of it as `attempt`."""

    storage: str
    name: str = "job"
    namespace: str = "test"
    checkpoint: dict[str, Any] | None = None

    @property
    def root(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.namespace}/{self.name}"

    def status(self) -> dict[str, Any]:
        return read_status_file(f"{self.root}/status.json")

    def latest_uri(self) -> str:
        return str(self.status()["latestCheckpoint"]["uri"])

    def env(
        self,
        config: dict[str, Any],
        *,
        nproc: int,
        attempt: int,
        resume_from: str | None,
        replicas: int = 1,
        node_rank: int = 0,
        master_port: int | None = None,
    ) -> dict[str, str]:
        contract = pod.PodContract(
            job=self.name,
            namespace=self.namespace,
            attempt=attempt,
            replicas=replicas,
            node_rank=node_rank,
            nproc_per_node=nproc,
            storage=self.storage,
            resume_from=resume_from,
            config=config,
            checkpoint=pod.CheckpointSettings.from_spec(self.checkpoint or {}),
            master_port=master_port or free_port(),
        )
        return {
            **os.environ,
            **contract.to_env(),
            "PYTHONPATH": PYTHONPATH,
            "SPOTRUN_PROGRESS_SECONDS": "0",
        }

    def start(
        self,
        config: dict[str, Any],
        *,
        nproc: int = 2,
        attempt: int = 0,
        resume_from: str | None = None,
        workload: str = "linear_steps.py",
        extra_env: dict[str, str] | None = None,
        **group: Any,
    ) -> subprocess.Popen[str]:
        """One launcher of the group; `group` (replicas, node_rank, master_port) places it."""
        env = self.env(config, nproc=nproc, attempt=attempt, resume_from=resume_from, **group)
        env.update(extra_env or {})
        # What the supervisor (operator or local mode) does before it starts an attempt.
        update_status_file(
            f"{self.root}/status.json", lambda status: status.update(attempt=attempt)
        )
        command = [
            *SPOTRUN,
            "launch",
            "--nproc-per-node",
            str(nproc),
            "--",
            sys.executable,
            str(WORKLOADS / workload),
        ]
        return subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def run(
        self, config: dict[str, Any], *, timeout: float = 180, **kwargs: Any
    ) -> tuple[int, str]:
        proc = self.start(config, **kwargs)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(f"group did not finish in {timeout}s:\n{out}") from None
        return proc.returncode, out


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def send(proc: subprocess.Popen[str], signum: int = signal.SIGTERM) -> None:
    os.kill(proc.pid, signum)


def manifest_step(job: Job, seq: int) -> int:
    with open(f"{job.root}/ckpt-{seq:06d}/manifest.json") as handle:
        return int(json.load(handle)["step"])


def writer_config(tmp_path: Path, world_size: int = 1) -> WriterConfig:
    """A checkpoint writer's configuration: rank 0 of job default/job, attempt 1, in tmp_path."""
    return WriterConfig(
        root=str(tmp_path / "default" / "job"),
        rank=0,
        attempt=1,
        world_size=world_size,
        job="job",
        namespace="default",
    )
