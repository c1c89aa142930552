"""`spotrun run`: a TrainJob on this machine, supervised by the same policy as on a cluster.

Local mode is the operator's loop with processes for pods: each pass observes the replica
launchers (one `spotrun launch` per replica, `nprocPerNode` workers each), asks
`spotrun.lifecycle.plan` what to do, writes the policy's status fields into
`<storage>/<namespace>/<job>/status.json` (beside rank 0's checkpoint records, under the
same file lock) and applies the actions: start a group, restart it from the latest
checkpoint, back off, succeed, fail. Nothing here decides what an interruption is or
whether a budget is spent, so what works here works on the cluster and the reverse.

The status is written BEFORE a group starts: it carries the attempt that fences the
group's checkpoint records. The plan that bumps the attempt is computed under the status
file's lock, so a checkpoint recorded meanwhile is never passed over as the resume point.

Fault injection (spotrun.local.faults) rehearses spot capacity; a replica the supervisor hit is
flagged preempted, which is all the policy needs to tell it from a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import yaml

from spotrun import contract
from spotrun._orphans import die_with_parent
from spotrun.contract import PodContract
from spotrun.ledger.sink import read_status_file, status_file, update_status_file
from spotrun.lifecycle import (
    FAILED,
    FINISHED,
    OWNED_FIELDS,
    RESTARTING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Action,
    Fail,
    JobSpec,
    Plan,
    RestartGroup,
    StartGroup,
    Succeed,
    Suspend,
    Wait,
    format_time,
    plan,
    resume_point,
)
from spotrun.lifecycle.conditions import find as find_condition
from spotrun.lifecycle.group import GroupRecord
from spotrun.local import _fault_worker, faults, ownership
from spotrun.local.observe import ReplicaFacts, describe_exit, observe
from spotrun.local.ports import free_port
from spotrun.local.progress import (
    LEDGER_CONDITIONS,
    Display,
    Snapshot,
    make_display,
    print_summary,
)
from spotrun.local.status_command import StatusFileError, read_status
from spotrun.local.trainjob import TrainJob, TrainJobError, load_trainjob
from spotrun.pod.launcher import worker_command
from spotrun.store import layout
from spotrun.train import liveness

LOG_PREFIX = "[spotrun run]"
TRAINJOB_FILE = "trainjob.yaml"
LOGS_DIR = "logs"

POLL_SECONDS = 0.2
# Replicas of an attempt that was replaced: status.attempt already fences their writes, so
# a graceful stop would save nothing; they get SIGTERM and this long before SIGKILL.
STOP_GRACE_SECONDS = 5.0
# After the job succeeded, how long its replicas get to exit on their own before SIGTERM.
FINISHING_SECONDS = 2.0
# A spare that exits on its own is started again after this pause, doubled each time in a row.
SPARE_RETRY_SECONDS = 5.0
SPARE_RETRY_MAX_SECONDS = 300.0
# How often, at most, rank 0 writes lastMetrics: the live view and the hang check read it
# (a short progressDeadlineSeconds asks for more, spotrun.contract.timing_env).
LONGEST_PROGRESS_SECONDS = 1.0

_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")

# Local workers per CPU core, at most: beyond that a run only thrashes (or forks until the
# machine gives up), and the file is meant for a cluster.
WORKERS_PER_CORE = 4
# Storage that lives inside one process: replicas, their writers and the supervisor are
# processes of their own, so nothing written there would survive or be seen.
PROCESS_LOCAL_STORAGE = ("memory",)


class LocalRunError(RuntimeError):
    """The TrainJob cannot run locally as asked; the message says what to change."""


@dataclass(frozen=True)
class Options:
    """`spotrun run`'s flags, parsed."""

    storage: str | None = None
    preempt_every: float | None = None
    kill_every: float | None = None
    freeze_every: float | None = None
    fail_rank: int | None = None
    fail_after: int = _fault_worker.DEFAULT_FAIL_AFTER
    max_injections: int | None = None
    random_intervals: bool = False
    seed: int | None = None
    live: bool = True
    spares: int = 0
    # A replica hit by an injected fault has no capacity for this long (its replacement is
    # "unschedulable"): an elastic job goes on without it, then grows back.
    unavailable_for: float | None = None


# --- pure helpers -----------------------------------------------------------------------


def owned(status: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `status` that the lifecycle policy writes."""
    return {name: status[name] for name in OWNED_FIELDS if name in status}


def merge_owned(target: dict[str, Any], decided: Mapping[str, Any]) -> None:
    """Sets the policy's fields of `target` to those of `decided`; leaves the runtime's alone."""
    for name in OWNED_FIELDS:
        if name in decided:
            target[name] = copy.deepcopy(decided[name])
        else:
            target.pop(name, None)


def storage_url(flag: str | None, spec_storage: str | None) -> str:
    """Where checkpoints go: --storage, else spec.checkpoint.storage, else ./spotrun-runs.

    A plain path is made absolute: every replica must name the same folder.
    """
    chosen = flag or spec_storage or layout.DEFAULT_STORAGE
    if "://" in chosen:
        return chosen.rstrip("/")
    return os.path.abspath(chosen)


def check_storage(flag: str | None, spec_storage: str | None) -> None:
    """Refuses storage that no other process can see (memory://)."""
    chosen, where = (flag, "--storage") if flag else (spec_storage, "spec.checkpoint.storage")
    if not chosen or "://" not in chosen:
        return
    protocol = chosen.split("://", 1)[0].lower()
    if protocol in PROCESS_LOCAL_STORAGE:
        raise LocalRunError(
            f"{where} {chosen} is {protocol}:// storage, which lives inside one process; local "
            "mode runs every replica, its checkpoint writers and the supervisor as processes "
            "of their own, so no checkpoint and no status would survive: give a folder "
            "(--storage ./spotrun-runs) or a bucket"
        )


def check_capacity(replicas: int, nproc_per_node: int, cores: int) -> None:
    """Refuses more local workers than WORKERS_PER_CORE per core of this machine."""
    workers = replicas * nproc_per_node
    most = WORKERS_PER_CORE * max(1, cores)
    if workers > most:
        raise LocalRunError(
            f"replicas x nprocPerNode = {replicas} x {nproc_per_node} = {workers} workers, more "
            f"than this machine can run: it has {cores} CPU core(s), and local mode starts at "
            f"most {WORKERS_PER_CORE} workers per core ({most}); lower spec.replicas or "
            "spec.nprocPerNode in a copy of the file to run it here (a cluster runs it as it is)"
        )


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def launcher_argv(job: TrainJob, *, inject_failure: bool) -> list[str]:
    """The argv of one replica: `spotrun launch` running the job's trainer.

    With `inject_failure`, every worker runs through spotrun.local._fault_worker, which fails the
    rank chosen by --fail-rank; it can wrap a function or a Python command only.
    """
    base = [sys.executable, "-m", "spotrun.cli", "launch", "--nproc-per-node"]
    base.append(str(job.nproc_per_node))
    trainer = job.trainer
    worker = [sys.executable, "-m", "spotrun.local._fault_worker"]
    if trainer.function:
        if inject_failure:
            return [*base, "--", *worker, trainer.function]
        return [*base, "--function", trainer.function]
    command = [*(trainer.command or ()), *trainer.args]
    if not inject_failure:
        return [*base, "--", *command]
    rest = command[1:]
    if not _PYTHON.match(os.path.basename(command[0])) or not rest:
        raise LocalRunError(
            f"--fail-rank runs the trainer inside the rank it fails, which works for a "
            f"trainer.function or a trainer.command of the form [python, script.py, ...] or "
            f"[python, -m, module, ...]; this job's command is {command}"
        )
    if rest[0].startswith("-") and rest[0] != "-m":
        raise LocalRunError(
            f"--fail-rank cannot wrap python option {rest[0]!r} in {command}: put the "
            "options in the script, or run without --fail-rank"
        )
    return [*base, "--", *worker, "--", *rest]


def mtbf_seconds(options: Options) -> float | None:
    """The mean time between injected faults, for the checkpoint cadence (Young/Daly)."""
    rates = [
        1.0 / s for s in (options.preempt_every, options.kill_every, options.freeze_every) if s
    ]
    return 1.0 / sum(rates) if rates else None


# --- one replica: a `spotrun launch` process --------------------------------------------


@dataclass
class _Replica:
    """One replica launcher of one attempt, in its own process group (its 'node')."""

    index: int
    attempt: int
    process: subprocess.Popen[bytes]
    log: str
    fault: faults.FaultKind | None = None
    returncode: int | None = None
    stopping: bool = False
    term_at: float | None = None
    kill_at: float | None = None

    @property
    def running(self) -> bool:
        return self.returncode is None

    def facts(self) -> ReplicaFacts:
        return ReplicaFacts(
            index=self.index,
            attempt=self.attempt,
            returncode=self.returncode,
            fault=self.fault,
            stopping=self.stopping,
            log=self.log,
        )

    def poll(self) -> bool:
        """Reaps the launcher; True when it exited since the last poll."""
        if self.returncode is not None:
            return False
        self.returncode = self.process.poll()
        return self.returncode is not None

    def signal(self, signum: int, *, group: bool = False) -> None:
        """Sends `signum` to the launcher, or with `group` to all its processes."""
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)

    def stop(self, now: float, grace: float, *, term_after: float = 0.0) -> None:
        """Asks the replica to go: SIGTERM after `term_after` seconds, SIGKILL `grace` later.

        With `term_after`, the replica first has that long to exit on its own.
        """
        if self.stopping or not self.running:
            self.stopping = True
            return
        self.stopping = True
        self.term_at = now + term_after
        self.kill_at = self.term_at + grace
        self.enforce(now)

    def enforce(self, now: float) -> None:
        if not self.running:
            return
        if self.term_at is not None and now >= self.term_at:
            self.signal(signal.SIGTERM)
            self.term_at = None
        if self.kill_at is not None and now >= self.kill_at:
            self.signal(signal.SIGKILL, group=True)
            self.kill_at = None

    def kill(self) -> None:
        self.signal(signal.SIGKILL, group=True)


# --- the supervisor ---------------------------------------------------------------------


@dataclass
class _Memory:
    """What the supervisor remembers between passes, beyond status.json."""

    ports: dict[int, int] = field(default_factory=dict)
    # lastMetrics as it was when an attempt started: a change means the attempt trains.
    progress_at_start: dict[int, Any] = field(default_factory=dict)
    training_since: dict[int, float] = field(default_factory=dict)
    exits: list[ReplicaFacts] = field(default_factory=list)
    # Per attempt, the spares promoted into it: node rank -> spare slot.
    promoted: dict[int, dict[int, int]] = field(default_factory=dict)
    # How many spares each slot started (their logs are numbered).
    spares_started: dict[int, int] = field(default_factory=dict)
    # Per slot, spares that exited on their own: (how many in a row, when to start the next).
    spare_failures: dict[int, tuple[int, float]] = field(default_factory=dict)
    # --unavailable-for: replica index -> until when it cannot be started again.
    held: dict[int, float] = field(default_factory=dict)


class LocalRun:
    """Supervises one TrainJob's replicas until it succeeds, fails or is stopped."""

    def __init__(
        self,
        job: TrainJob,
        options: Options,
        display: Display,
        *,
        storage: str,
        cwd: str,
        owned: ownership.Ownership | None = None,
    ) -> None:
        self.owned = owned
        self.job = job
        self.options = options
        self.display = display
        self.storage = storage
        self.cwd = cwd
        self.spec: JobSpec = job.job_spec()
        self.root = layout.job_root(storage, job.namespace, job.name)
        self.status_url = status_file(self.root)
        self.logs = os.path.join(_local_folder(self.root, job), LOGS_DIR)
        self.rng = random.Random(options.seed)
        intervals: dict[faults.FaultKind, float | None] = {
            "preempt": options.preempt_every,
            "kill": options.kill_every,
            "freeze": options.freeze_every,
        }
        every = {kind: seconds for kind, seconds in intervals.items() if seconds}
        self.schedule = (
            faults.FaultSchedule(
                every,
                options.max_injections,
                random.Random(options.seed),
                random_intervals=options.random_intervals,
            )
            if every
            else None
        )
        self.replicas: list[_Replica] = []
        # Warm spares (--spares): launchers whose workers imported and wait for a group that
        # promotes them; `index` is the spare's slot, `attempt` the one it was started in.
        self.spares: list[_Replica] = []
        self.memory = _Memory()
        # What an earlier run left (when carrying one on): only news is announced.
        self.status: dict[str, Any] = read_status(self.status_url)
        self.holding: str | None = None
        self.interrupted = 0  # SIGINT/SIGTERM received by the supervisor
        self.started = time.time()
        self._last_pass = time.monotonic()
        # The last pass wrote the status: the next runs at once (see run()).
        self._wrote = False
        self._argv = launcher_argv(job, inject_failure=options.fail_rank is not None)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Runs passes until the job is finished (or suspended) and no replica is left."""
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            again = False
            while not self.step():
                # A pass that wrote the status is followed by another at once, as the
                # operator's loop is woken by its own status update: the pass that records
                # an interruption and the one that restarts the group are not a poll apart
                # (a warm recovery paid 0.2 s for it). At most one such pass in a row.
                again = self._wrote and not again
                if not again:
                    time.sleep(POLL_SECONDS)
        finally:
            for replica in [*self.replicas, *self.spares]:
                replica.kill()
            for replica in [*self.replicas, *self.spares]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    replica.process.wait(timeout=10)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self.status

    def step(self) -> bool:
        """One pass: observe, plan, write the status, act. True when there is nothing left."""
        now = time.time()
        elapsed = time.monotonic() - self._last_pass
        self._last_pass = time.monotonic()
        if self.interrupted > 1:
            for replica in self.replicas:
                replica.kill()
        if self.owned is not None:
            self.owned.renew(now)  # a lease on a bucket; JobOwnedError ends the run
        for replica in self.replicas:
            replica.enforce(now)
            if replica.poll():
                self._exited(replica)
        self._reap_spares(now)
        status = read_status_file(self.status_url)
        facts = [r.facts() for r in self.replicas]
        held = {i: until for i, until in self.memory.held.items() if until > now}
        self.memory.held = held
        observation = observe(facts, status, now=now, suspended=self.interrupted > 0, held=held)
        decision = plan(self.spec, status, observation, self.rng)
        self._wrote = owned(decision.status) != owned(status)
        if self._wrote:
            decision = self._write(observation)
        actions: tuple[Action, ...] = decision.actions
        status = decision.status
        self.holding = next(
            (
                "the group is committing its final checkpoint"
                for a in actions
                if isinstance(a, Wait) and a.reason == "CommittingFinalCheckpoint"
            ),
            None,
        )
        self._notice_changes(status, now)
        self.status = status
        self._apply(actions, now)
        self._keep_joiners(now)
        self._keep_spares(now)
        self._forget_stale()
        self._inject(elapsed, now)
        self.display.update(self._snapshot(now))
        state = status.get("state")
        done = state in FINISHED or (state == SUSPENDED and self.interrupted > 0)
        if self.job.suspend and state == SUSPENDED:
            done = True
        if done:
            for spare in self.spares:
                spare.stop(now, STOP_GRACE_SECONDS)
        return done and not any(r.running for r in [*self.replicas, *self.spares])

    def _write(self, observation: Any) -> Plan:
        """Plans again under the status file's lock and writes the policy's fields."""
        decided: list[Plan] = []

        def mutate(current: dict[str, Any]) -> None:
            decision = plan(self.spec, current, observation, self.rng)
            merge_owned(current, decision.status)
            group = current.get("group")
            if isinstance(group, dict) and "masterPort" not in group:
                # The rendezvous port of the attempt: a free one on this machine, published
                # so that kept replicas (warm recovery) join the same one as new ones.
                port = self.memory.ports.setdefault(int(group["attempt"]), free_port())
                group["masterPort"] = port
                self._promote(group)
                decision.status["group"] = copy.deepcopy(group)
            decided.append(decision)

        update_status_file(self.status_url, mutate)
        return decided[-1]

    # -- actions ----------------------------------------------------------------------

    def _apply(self, actions: Sequence[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, StartGroup | RestartGroup):
                keep = action.keep if isinstance(action, RestartGroup) else ()
                self._ensure_group(action.attempt, action.resume_from, now, keep)
            elif isinstance(action, Succeed):
                # Replicas still running are closing (a last commit, which SIGTERM does not
                # stop: the launcher's grace covers it), or wait in a group that can no longer
                # form (a spare promoted as the last member finished): they get a short while
                # on their own, then SIGTERM.
                for replica in self.replicas:
                    replica.stop(now, self._launcher_grace(), term_after=FINISHING_SECONDS)
            elif isinstance(action, Fail):
                for replica in self.replicas:
                    replica.stop(now, STOP_GRACE_SECONDS)
            elif isinstance(action, Suspend):
                # SIGTERM is a preemption notice to the group: its final checkpoint is kept.
                # SIGKILL when the pod's grace ends, as the kubelet would.
                for replica in self.replicas:
                    replica.stop(now, max(self._pod_grace(), self._launcher_grace() + 1))
            # Wait: the loop polls anyway; DeleteJob (ttlSecondsAfterFinished): the local
            # run ends with the job, its folder stays for `spotrun status`.

    def _ensure_group(
        self, attempt: int, resume_from: str | None, now: float, keep: Sequence[int] = ()
    ) -> None:
        """The group of `attempt` should run: stop the others, start what is missing.

        Replicas in `keep` (a warm recovery) join `attempt` as they are: their launchers
        see the new group in the status and their workers re-form it in place.
        """
        for replica in self.replicas:
            if replica.attempt != attempt and replica.running:
                if (
                    replica.index in keep
                    and replica.attempt == attempt - 1
                    and not replica.stopping
                ):
                    replica.attempt = attempt
                    self.display.event(
                        now,
                        f"attempt {attempt}: replica {replica.index} (pid {replica.process.pid}) "
                        "kept, re-forming in place",
                        quiet=True,
                    )
                    continue
                # A frozen replica cannot act on SIGTERM: as a pod whose node is gone, it is
                # removed at once (the operator force-deletes those).
                replica.stop(now, 0.0 if replica.fault == "freeze" else STOP_GRACE_SECONDS)
        if attempt not in self.memory.progress_at_start:
            self.memory.ports.setdefault(attempt, free_port())
            self.memory.progress_at_start[attempt] = self.status.get("lastMetrics")
            where = f"from {_short(resume_from)}" if resume_from else "from scratch"
            step = (self.status.get("latestCheckpoint") or {}).get("step")
            if resume_from and step is not None and resume_from == _latest_uri(self.status):
                where += f" (step {step})"
            promoted = len(self.memory.promoted.get(attempt, {}))
            fresh = self.spec.pool - len(keep) - promoted
            kept = f", keeping {len(keep)} (warm)" if keep else ""
            spares = f", promoting {promoted} spare(s)" if promoted else ""
            self.display.event(
                now, f"attempt {attempt}: starting {fresh} replica(s) {where}{kept}{spares}"
            )
        for index, slot in self.memory.promoted.pop(attempt, {}).items():
            spare = next((s for s in self.spares if s.index == slot and s.running), None)
            if spare is None:
                continue  # it exited meanwhile: a new replica is started below instead
            self.spares.remove(spare)
            self.memory.spare_failures.pop(slot, None)
            spare.index, spare.attempt = index, attempt
            self.replicas.append(spare)
            self.display.event(
                now,
                f"attempt {attempt}: spare {slot} (pid {spare.process.pid}) promoted to "
                f"replica {index}",
            )
        # With spec.spares the pool is larger than the group: the pods outside it wait.
        for index in range(self.spec.pool):
            if any(r.index == index and r.attempt == attempt for r in self.replicas):
                continue
            if any(r.index == index and r.running for r in self.replicas):
                continue  # as a StatefulSet does: the old pod goes before the new one comes
            if self.memory.held.get(index, 0.0) > now:
                continue  # no capacity for it yet (--unavailable-for): it stays pending
            self.replicas.append(self._start(index, attempt, resume_from))

    def _keep_joiners(self, now: float) -> None:
        """Elastic or spec.spares: a replica outside the group that is gone is started again.

        It runs for the current attempt, as a StatefulSet's pod would (once its capacity
        came back); its launcher finds itself outside the group and waits until the policy
        names it: an elastic group grows back, or a spare takes a lost member's place.
        """
        state = self.status.get("state")
        attempt = int(self.status.get("attempt") or 0)
        if (self.spec.elastic is None and not self.spec.spares) or self.interrupted or not attempt:
            return
        if state not in (RUNNING, RESTARTING):
            return
        for index in range(self.spec.pool):
            if any(r.index == index and (r.running or r.attempt == attempt) for r in self.replicas):
                continue
            if self.memory.held.get(index, 0.0) > now:
                continue
            self.display.event(
                now, f"attempt {attempt}: replica {index} has capacity again; starting it"
            )
            self.replicas.append(self._start(index, attempt, resume_point(self.spec, self.status)))

    # -- warm spares ------------------------------------------------------------------

    def _promote(self, group: dict[str, Any]) -> None:
        """Under the status lock, as a warm group is recorded: spares take the lost ranks.

        The policy decided who stays (`kept`); which process fills a lost rank is this
        executor's choice, as a scheduler's: a waiting spare, else a new replica. The
        promotion goes into status.group with the membership, so the spare's launcher and
        the survivors' learn of the group in the same write.
        """
        if group.get("mode") != "warm" or not group.get("kept"):
            return
        attempt = int(group["attempt"])
        kept = {int(i) for i in group.get("kept") or ()}
        lost = [i for i in range(int(group["replicas"])) if i not in kept]
        ready = sorted(s.index for s in self.spares if s.running and not s.stopping)
        pairs = list(zip(ready, lost, strict=False))
        if not pairs:
            return
        group["promoted"] = [{"spare": slot, "nodeRank": rank} for slot, rank in pairs]
        self.memory.promoted[attempt] = {rank: slot for slot, rank in pairs}

    def _keep_spares(self, now: float) -> None:
        """Starts the spares that are missing while the job runs (a promoted one's slot too).

        A spare starts once the current attempt trains, the first ones too: on one machine
        a spare's start (two imports of torch, its worker's and its writer's) would take the
        CPU from the group's own start, or from a promoted spare still catching up, which
        the whole group waits for. A fault before the spare is ready starts a new replica.
        """
        wanted = self.options.spares
        state = self.status.get("state")
        if not wanted or state in FINISHED or state == SUSPENDED or self.interrupted:
            return
        attempt = int(self.status.get("attempt") or 0)
        if not attempt or attempt not in self.memory.training_since:
            return
        for slot in range(wanted):
            if any(s.index == slot for s in self.spares):
                continue
            failed = self.memory.spare_failures.get(slot)
            if failed is not None and now < failed[1]:
                continue  # a spare that keeps failing is retried after a growing pause
            self.spares.append(self._start_spare(slot))

    def _reap_spares(self, now: float) -> None:
        for spare in list(self.spares):
            spare.enforce(now)
            if spare.poll():
                assert spare.returncode is not None
                self.spares.remove(spare)
                if not spare.stopping:
                    count = self.memory.spare_failures.get(spare.index, (0, now))[0] + 1
                    pause = min(SPARE_RETRY_MAX_SECONDS, SPARE_RETRY_SECONDS * 2 ** (count - 1))
                    self.memory.spare_failures[spare.index] = (count, now + pause)
                    self.display.event(
                        now,
                        f"spare {spare.index}: launcher {describe_exit(spare.returncode)}; "
                        f"log: {spare.log}; a new spare in {pause:g}s",
                    )

    def _start_spare(self, slot: int) -> _Replica:
        attempt = int(self.status.get("attempt") or 0)
        resume_from = resume_point(self.spec, self.status)
        # Node 0's environment until promoted: the group file then gives the real one.
        env = self._env(0, attempt, resume_from)
        env[contract.SPARE] = str(slot)
        started = self.memory.spares_started[slot] = self.memory.spares_started.get(slot, 0) + 1
        folder = os.path.join(self.logs, "spares")
        return self._spawn(folder, f"spare-{slot}-{started}.log", env, slot, attempt)

    def _start(self, index: int, attempt: int, resume_from: str | None) -> _Replica:
        env = self._env(index, attempt, resume_from)
        folder = os.path.join(self.logs, f"attempt-{attempt:03d}")
        return self._spawn(folder, f"replica-{index}.log", env, index, attempt)

    def _spawn(
        self, folder: str, name: str, env: dict[str, str], index: int, attempt: int
    ) -> _Replica:
        os.makedirs(folder, exist_ok=True)
        log_path = os.path.join(folder, name)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                self._argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(os.getpid()),
            )
        return _Replica(index, attempt, process, log_path)

    def _env(self, index: int, attempt: int, resume_from: str | None) -> dict[str, str]:
        job = self.job
        pod = PodContract(
            job=job.name,
            namespace=job.namespace,
            attempt=attempt,
            replicas=job.replicas,
            nproc_per_node=job.nproc_per_node,
            node_rank=index,
            storage=self.storage,
            resume_from=resume_from,
            config=job.config,
            checkpoint=job.checkpoint.settings,
            master_addr="127.0.0.1",
            master_port=self.memory.ports[attempt],
            function=job.trainer.function if self.options.fail_rank is None else None,
        )
        env = dict(os.environ)
        for name in (contract.STATUS_SINK, contract.HOLD_AFTER_SUCCESS, contract.FUNCTION):
            env.pop(name, None)
        env.update({e.name: e.value or "" for e in job.trainer.env})
        env.update(pod.to_env())
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (self.cwd, os.environ.get("PYTHONPATH", "")) if p
        )
        # As if the virtualenv were activated: `python` in trainer.command is this one.
        env["PATH"] = os.pathsep.join(
            p for p in (os.path.dirname(sys.executable), os.environ.get("PATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        env[contract.RECOVERY] = self.spec.recovery
        if self.spec.elastic is not None:
            env[contract.ELASTIC_BATCH] = self.spec.elastic.batch
            env[contract.TARGET_REPLICAS] = str(self.spec.replicas)
        if self.spec.spares:
            env[contract.SPARES] = str(self.spec.spares)
        # The rule the operator follows: the launcher's deadline from the pod's grace, the
        # progress reports from the hang deadline.
        env.update(contract.timing_env(job.spec, longest_progress=LONGEST_PROGRESS_SECONDS))
        mtbf = mtbf_seconds(self.options)
        if mtbf is not None:
            env.setdefault(contract.MTBF, f"{mtbf:g}")
        # The job's observed MTBF, as the operator puts it in a new attempt's pod template
        # (kept replicas get it in their next group file); trainer.env's own MTBF wins.
        env.pop(contract.OBSERVED_MTBF, None)
        record = GroupRecord.from_status(self.status)
        if record is not None and record.attempt == attempt:
            env.update(contract.observed_mtbf_env(record.mtbf_seconds))
        if self.options.fail_rank is not None:
            env[_fault_worker.FAIL_RANK] = str(self.options.fail_rank)
            env[_fault_worker.FAIL_AFTER] = str(self.options.fail_after)
        return env

    def _launcher_grace(self) -> float:
        return contract.launcher_grace_seconds(self._pod_grace())

    def _pod_grace(self) -> float:
        return contract.pod_grace_seconds(self.job.spec)

    def _forget_stale(self) -> None:
        """Replicas of older attempts are forgotten once they exited (a deleted pod is gone)."""
        attempt = int(self.status.get("attempt") or 0)
        self.replicas = [r for r in self.replicas if r.attempt == attempt or r.running]

    def _exited(self, replica: _Replica) -> None:
        self.memory.exits.append(replica.facts())
        assert replica.returncode is not None
        how = describe_exit(replica.returncode)
        if replica.returncode == contract.EXIT_PREEMPTED:
            how += " (preemption notice honoured, final checkpoint committed)"
        if replica.stopping and replica.attempt != int(self.status.get("attempt") or 0):
            how += " (stopped: replaced by a newer attempt)"
        self.display.event(
            time.time(),
            f"attempt {replica.attempt} replica {replica.index}: launcher {how}",
            quiet=replica.returncode == 0,
        )

    # -- fault injection --------------------------------------------------------------

    def _inject(self, elapsed: float, now: float) -> None:
        schedule = self.schedule
        if schedule is None or self.interrupted:
            return
        attempt = int(self.status.get("attempt") or 0)
        group = [r for r in self.replicas if r.attempt == attempt]
        size = int((self.status.get("group") or {}).get("replicas") or self.spec.replicas)
        members = set((self.status.get("group") or {}).get("members") or range(size))
        group = [r for r in group if r.index in members]
        training = (
            self.status.get("state") == RUNNING
            and attempt in self.memory.training_since
            and len(group) == size
            and all(r.running and r.fault is None and not r.stopping for r in group)
        )
        if not training:
            return
        schedule.advance(elapsed)
        kind = schedule.due()
        if kind is None:
            return
        chosen = schedule.choose([r.index for r in group])
        victim = next(r for r in group if r.index == chosen)
        victim.fault = kind
        schedule.fired(kind)
        self.display.event(
            now,
            f"injected {kind} into replica {victim.index} of attempt {attempt}: "
            f"{faults.DESCRIPTIONS[kind]}",
        )
        if kind == "kill":
            victim.kill()
        elif kind == "freeze":
            victim.signal(faults.SIGNALS[kind], group=True)
        else:
            victim.signal(faults.SIGNALS[kind])
        if self.options.unavailable_for:
            self.memory.held[victim.index] = now + self.options.unavailable_for
            self.display.event(
                now,
                f"replica {victim.index} has no capacity for "
                f"{faults.format_duration(self.options.unavailable_for)} (--unavailable-for)",
            )

    # -- what changed, for people -----------------------------------------------------

    def _notice_changes(self, status: Mapping[str, Any], now: float) -> None:
        before = self.status
        attempt = int(status.get("attempt") or 0)
        if (
            attempt in self.memory.progress_at_start
            and attempt not in self.memory.training_since
            and status.get("lastMetrics") != self.memory.progress_at_start[attempt]
        ):
            self.memory.training_since[attempt] = now
            step = (status.get("lastMetrics") or {}).get("step")
            self.display.event(now, f"attempt {attempt}: training (step {step})", quiet=True)
        old_entries = before.get("interruptions") or []
        for entry in (status.get("interruptions") or [])[len(old_entries) :]:
            at = f" at step {entry['step']}" if "step" in entry else ""
            self.display.event(
                now,
                f"attempt {entry.get('attempt')} interrupted{at}: {entry.get('kind')} "
                f"({entry.get('reason')}): {entry.get('message')}",
            )
        if status.get("state") != before.get("state"):
            self.display.event(now, f"state {status.get('state')}{_state_reason(status)}")
        for type_, label in LEDGER_CONDITIONS.items():
            new = find_condition(status.get("conditions") or [], type_) or {}
            old = find_condition(before.get("conditions") or [], type_) or {}
            if new.get("status") == "True" and new.get("message") != old.get("message"):
                self.display.event(now, f"{label}: {new.get('message')}")

    def _snapshot(self, now: float) -> Snapshot:
        schedule = self.schedule
        return Snapshot(
            job=self.job.name,
            namespace=self.job.namespace,
            status=self.status,
            now=now,
            started=self.started,
            replicas=self.spec.replicas,
            running=tuple(
                (r.index, r.process.pid)
                for r in self.replicas
                if r.running and r.attempt == int(self.status.get("attempt") or 0)
            ),
            total_steps=_total_steps(self.job),
            next_faults={
                kind: schedule.remaining(kind) for kind in faults.KINDS if kind in schedule.every
            }
            if schedule is not None
            else {},
            holding=self.holding,
            spares=sum(1 for s in self.spares if s.running and not s.stopping),
        )

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.interrupted += 1
        if self.interrupted == 1:
            self.display.event(
                time.time(),
                f"{signal.Signals(signum).name}: suspending the job (final checkpoint, then "
                "stop); again to kill the workers at once",
            )

    # -- reporting --------------------------------------------------------------------

    def training_started(self) -> Mapping[int, float]:
        """Per attempt, when its first progress report was seen."""
        return dict(self.memory.training_since)

    def failure_log(self) -> str | None:
        """The log of the replica whose failure ended the job, if one failed on its own."""
        attempt = int(self.status.get("attempt") or 0)
        failed = [
            f
            for f in self.memory.exits
            if f.attempt == attempt
            and f.fault is None
            and not f.stopping
            and f.exit_code not in (0, contract.EXIT_PREEMPTED)
        ]
        return failed[0].log if failed else None


# --- helpers ----------------------------------------------------------------------------


def _total_steps(job: TrainJob) -> int | None:
    steps = job.config.get("steps")
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _latest_uri(status: Mapping[str, Any]) -> str | None:
    uri = (status.get("latestCheckpoint") or {}).get("uri")
    return str(uri) if uri else None


def _short(uri: str | None) -> str:
    """The checkpoint's folder name (ckpt-000012) for messages; the whole URI is in status."""
    return (uri or "").rstrip("/").rsplit("/", 1)[-1]


def _state_reason(status: Mapping[str, Any]) -> str:
    """` (reason)` of the Running condition, or `: reason: message` of Failed."""
    failed = status.get("state") == FAILED
    for cond in status.get("conditions") or []:
        if cond.get("type") == (FAILED if failed else "Running"):
            if failed:
                return f": {cond.get('reason')}: {cond.get('message')}"
            return f" ({cond.get('reason')})"
    return ""


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_folder(root: str, job: TrainJob) -> str:
    """The job's folder on this machine: the job root itself for local storage."""
    if _is_local(root):
        return root.removeprefix("file://")
    return os.path.join(os.path.abspath(layout.DEFAULT_STORAGE), job.namespace, job.name)


def prepare_folder(root: str, job: TrainJob, now: float) -> str | None:
    """Makes the job folder ready for this run; returns a note for people, if any.

    A folder whose status says the job finished belongs to an earlier run: it is moved
    aside to `<job>.<completion time>` (a job name has no dots, so it never collides) and
    this run starts fresh. A folder whose status says the job is unfinished is carried on:
    the policy sees the old group gone and restarts it from the latest checkpoint, as the
    operator would after a restart of its own.
    """
    status = read_status(status_file(root))
    note = None
    state = status.get("state")
    if state in FINISHED:
        if not _is_local(root):
            raise LocalRunError(
                f"{root} holds a run that already {str(state).lower()}; delete that folder or "
                "pass another --storage to run the job again"
            )
        local = _local_folder(root, job)
        stamp = str(status.get("completionTime") or format_time(now))
        stamp = re.sub(r"[^0-9TZ]", "", stamp.split(".")[0])
        aside = f"{local}.{stamp}"
        os.rename(local, aside)
        note = f"an earlier run of {job.name} {str(state).lower()}: moved it to {aside}"
        status = {}
    elif state:
        note = (
            f"carrying on the unfinished run in {root} (state {state}, attempt "
            f"{status.get('attempt')}); it resumes from its latest checkpoint"
        )
    _write_manifest(root, job, now, keep_existing=bool(status))
    return note


def _write_manifest(root: str, job: TrainJob, now: float, *, keep_existing: bool) -> None:
    """Keeps the TrainJob beside its status, as the API server keeps the object (for `status`)."""
    local = _local_folder(root, job)
    path = os.path.join(local, TRAINJOB_FILE)
    if keep_existing and os.path.exists(path):
        return
    os.makedirs(local, exist_ok=True)
    manifest = copy.deepcopy(dict(job.manifest))
    metadata = manifest.setdefault("metadata", {})
    metadata.setdefault("namespace", job.namespace)
    metadata["creationTimestamp"] = format_time(round(now))
    metadata["generation"] = 1
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(manifest, handle, sort_keys=False)


def _exit_code(status: Mapping[str, Any], interrupted: bool) -> int:
    state = status.get("state")
    if state == SUCCEEDED:
        return 0
    if state == FAILED:
        return 1
    return 130 if interrupted else 0


# --- the `spotrun run` subcommand -------------------------------------------------------

HELP = "run a TrainJob on this machine, restarted through preemptions (local mode)"


def _duration(text: str) -> float:
    try:
        return faults.parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `spotrun run`."""
    parser.add_argument(
        "file", metavar="FILE", help="the TrainJob (YAML), e.g. examples/trainjob.yaml"
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help=(
            "where checkpoints and status.json go (a path or an fsspec URL; default: "
            "spec.checkpoint.storage, else ./spotrun-runs)"
        ),
    )
    parser.add_argument(
        "--preempt-every",
        type=_duration,
        metavar="DURATION",
        help="preempt a random replica (SIGTERM: notice, final checkpoint) after each DURATION of training, e.g. 20s",
    )
    parser.add_argument(
        "--kill-every",
        type=_duration,
        metavar="DURATION",
        help="kill a random replica (SIGKILL, no notice) after each DURATION of training, e.g. 45s",
    )
    parser.add_argument(
        "--freeze-every",
        type=_duration,
        metavar="DURATION",
        help=(
            "freeze a random replica (SIGSTOP: its connections stay open and nothing answers, "
            "as a node powered off) after each DURATION of training; its peers report it"
        ),
    )
    parser.add_argument(
        "--max-injections",
        type=int,
        metavar="N",
        help="inject at most N faults in all (default: no limit)",
    )
    parser.add_argument(
        "--fail-rank",
        type=int,
        metavar="RANK",
        help="make global rank RANK raise an application error in every attempt",
    )
    parser.add_argument(
        "--fail-after",
        type=int,
        default=_fault_worker.DEFAULT_FAIL_AFTER,
        metavar="N",
        help=f"with --fail-rank: fail at that rank's N-th report of each attempt (default {_fault_worker.DEFAULT_FAIL_AFTER})",
    )
    parser.add_argument(
        "--random-intervals",
        action="store_true",
        help=(
            "draw each interval of --preempt-every/--kill-every from an exponential "
            "distribution with that mean (faults as a Poisson process, as spot reclaims are "
            "modelled) instead of using it exactly; --seed replays the draws"
        ),
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", help="seed of the fault and backoff draws, to replay a run"
    )
    parser.add_argument(
        "--spares",
        type=int,
        default=0,
        metavar="K",
        help=(
            "keep K warm spares (replicas started, imports done, waiting): a preemption "
            "promotes one at once, and a new spare takes its place (warm recovery only)"
        ),
    )
    parser.add_argument(
        "--unavailable-for",
        type=_duration,
        metavar="DURATION",
        help=(
            "a replica hit by an injected fault cannot be started again for DURATION, as a "
            "node with no spot capacity left: an elastic job (spec.elastic) goes on with the "
            "others, then grows back; another waits for it"
        ),
    )
    parser.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="plain log lines instead of the live view (the default when not on a terminal)",
    )


def main(args: argparse.Namespace) -> int:
    """Run `spotrun run` from parsed arguments; returns the exit code."""
    try:
        job = load_trainjob(args.file)
    except TrainJobError as err:
        print(err, file=sys.stderr)
        return 2
    options = Options(
        storage=args.storage,
        preempt_every=args.preempt_every,
        kill_every=args.kill_every,
        freeze_every=args.freeze_every,
        fail_rank=args.fail_rank,
        fail_after=args.fail_after,
        max_injections=args.max_injections,
        random_intervals=args.random_intervals,
        seed=args.seed,
        live=args.live,
        spares=args.spares,
        unavailable_for=args.unavailable_for,
    )
    held: ownership.Ownership | None = None
    try:
        _check(job, options)
        check_storage(options.storage, job.checkpoint.storage)
        storage = storage_url(options.storage, job.checkpoint.storage)
        root = layout.job_root(storage, job.namespace, job.name)
        held = ownership.acquire(root)
        note = prepare_folder(root, job, time.time())
    except (LocalRunError, ownership.JobOwnedError, StatusFileError, OSError) as err:
        if held is not None:
            held.release()
        print(f"{LOG_PREFIX} error: {err}", file=sys.stderr)
        return 2

    display = make_display(live=options.live)
    run = LocalRun(job, options, display, storage=storage, cwd=os.getcwd(), owned=held)
    try:
        with display:
            if note:
                display.event(time.time(), note)
            display.event(time.time(), _banner(job, options, run))
            status = run.run()
    except ownership.JobOwnedError as err:
        print(f"{LOG_PREFIX} error: {err}", file=sys.stderr)
        return 2
    finally:
        held.release()
    print_summary(
        status,
        job=job.name,
        namespace=job.namespace,
        elapsed=time.time() - run.started,
        total_steps=_total_steps(job),
        training_started=run.training_started(),
        status_path=run.status_url,
        failure_log=run.failure_log(),
    )
    if status.get("state") == SUSPENDED and run.interrupted:
        print(f"suspended: `spotrun run {args.file}` carries it on from its latest checkpoint")
    return _exit_code(status, run.interrupted > 0)


def _check(job: TrainJob, options: Options) -> None:
    check_capacity(job.replicas, job.nproc_per_node, usable_cores())
    if options.fail_rank is not None and not 0 <= options.fail_rank < job.world_size:
        raise LocalRunError(
            f"--fail-rank {options.fail_rank} is not a rank of this job: ranks run from 0 to "
            f"{job.world_size - 1} (replicas x nprocPerNode)"
        )
    if options.fail_after < 1:
        raise LocalRunError(f"--fail-after must be >= 1, got {options.fail_after}")
    if options.max_injections is not None and options.max_injections < 0:
        raise LocalRunError(f"--max-injections must be >= 0, got {options.max_injections}")
    if options.spares:
        check_spares(job, options)
    pooled = job.job_spec().spares
    if pooled:
        check_spares(job, dataclasses.replace(options, spares=pooled), flag="spec.spares")
        if options.spares:
            raise LocalRunError(
                f"--spares {options.spares} and spec.spares {pooled} both ask for warm "
                "spares: give one of them"
            )
    injects = options.preempt_every or options.kill_every or options.freeze_every
    if options.random_intervals and not injects:
        raise LocalRunError(
            "--random-intervals draws the intervals of injected faults: give --preempt-every, "
            "--kill-every or --freeze-every too"
        )
    if options.unavailable_for is not None and not injects:
        raise LocalRunError(
            "--unavailable-for holds back replicas hit by an injected fault: give "
            "--preempt-every, --kill-every or --freeze-every too"
        )
    values = {e.name: e.value for e in job.trainer.env if e.value is not None}
    try:
        peer_timeout = liveness.peer_timeout(values)
    except ValueError as err:
        raise LocalRunError(f"trainer.env: {err}") from None
    if options.freeze_every and (job.job_spec().recovery != "warm" or peer_timeout == 0):
        raise LocalRunError(
            "--freeze-every needs a warm group that watches its peers (spec.recovery: Warm, "
            f"{contract.PEER_TIMEOUT} not 0): nothing else can tell a frozen replica from a "
            "live one, and the group would wait for its progress deadline"
        )
    sourced = [e.name for e in job.trainer.env if e.value_from is not None]
    if sourced:
        raise LocalRunError(
            f"trainer.env {', '.join(sourced)} use valueFrom (secrets, fields of the pod), which "
            "only a cluster can resolve: give them a value in a copy of the file to run locally"
        )
    launcher_argv(job, inject_failure=options.fail_rank is not None)


def check_spares(job: TrainJob, options: Options, flag: str = "--spares") -> None:
    """--spares (or spec.spares) needs what a spare joins through: warm recovery, a
    re-entrant trainer."""
    if options.spares < 0:
        raise LocalRunError(f"{flag} must be >= 0, got {options.spares}")
    spec = job.job_spec()
    if spec.recovery != "warm":
        raise LocalRunError(
            f"{flag} needs spec.recovery: Warm (a spare joins the group in a warm recovery); "
            "this job asks for Cold"
        )
    if job.replicas < 2:
        raise LocalRunError(
            f"{flag} needs replicas >= 2: a warm recovery keeps the survivors of a group, "
            "and a group of one has none"
        )
    if flag == "--spares" and spec.elastic is not None:
        raise LocalRunError(
            f"--spares cannot be combined with spec.elastic: put spares: {options.spares} in "
            "the TrainJob's spec instead (spec.spares runs locally as on a cluster, and an "
            "elastic group fills a lost place from a waiting spare before it shrinks)"
        )
    if options.fail_rank is not None:
        raise LocalRunError(
            f"{flag} cannot be combined with --fail-rank: an application failure restarts "
            "the whole group (no spare is used), and the failing worker cannot wait to be "
            "promoted"
        )
    command = [*(job.trainer.command or ()), *job.trainer.args]
    argv = worker_command(command, job.trainer.function, warm=True)
    if not job.trainer.function and argv == command:
        raise LocalRunError(
            f"{flag} needs a trainer.function, or a trainer.command of the form "
            "[python, script.py, ...] or [python, -m, module, ...] (run in a worker that "
            f"can wait to be promoted); this job's command is {command}"
        )
    cores = usable_cores()
    if options.spares * job.nproc_per_node > cores:
        raise LocalRunError(
            f"{flag} {options.spares} x {job.nproc_per_node} worker(s) is more processes "
            f"than this machine's {cores} core(s) should wait with; use fewer spares"
        )


def _banner(job: TrainJob, options: Options, run: LocalRun) -> str:
    trainer = job.trainer.function or " ".join([*(job.trainer.command or ()), *job.trainer.args])
    injected = [
        f"{name} every {faults.format_duration(seconds)}"
        for name, seconds in (
            ("preempt", options.preempt_every),
            ("kill", options.kill_every),
            ("freeze", options.freeze_every),
        )
        if seconds
    ]
    if options.fail_rank is not None:
        injected.append(f"rank {options.fail_rank} fails at its report {options.fail_after}")
    faults_text = "; faults: " + ", ".join(injected) if injected else ""
    count = options.spares or job.job_spec().spares
    spares = f" + {count} warm spare(s)" if count else ""
    return (
        f"{job.namespace}/{job.name}: {job.replicas} replica(s) x {job.nproc_per_node} worker(s)"
        f"{spares} running {trainer}; checkpoints in {run.root}; logs in {run.logs}{faults_text}"
    )
