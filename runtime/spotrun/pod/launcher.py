"""`spotrun launch`: start one pod's workers, supervise them, and turn signals into one shutdown.

A pod gets one SIGTERM when its spot node is reclaimed and is SIGKILLed when its grace
period ends. The launcher is the pod's main process, so it is where that SIGTERM lands:
it forwards it to every worker (whose sessions then agree on a final checkpoint and exit
with EXIT_PREEMPTED), waits up to a deadline shorter than the pod's grace period, and
kills what is left. It restarts nothing: the group is restarted as a whole by the
operator (or by `spotrun run`), so its only outputs are its workers' fate folded into one
exit code (`exit_code`) and log lines prefixed `[spotrun launch]` on stderr.

Workers are plain children with PR_SET_PDEATHSIG=SIGKILL: a launcher that dies, even by
SIGKILL, takes its workers with it, so a restarted pod never races orphans from the last
attempt for the GPU or the checkpoint. It imports no torch: it starts in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

from spotrun import contract
from spotrun._orphans import die_with_parent
from spotrun.contract import PodContract
from spotrun.ledger.sink import make_sink
from spotrun.lifecycle.group import GroupRecord, rendezvous_port
from spotrun.membership import beats, watch
from spotrun.membership.groupfile import GroupFile, read_lost_reports
from spotrun.store import layout

LOG_PREFIX = "[spotrun launch]"

# The operator and `spotrun run` derive it from the pod's terminationGracePeriodSeconds
# (contract.launcher_grace_seconds); without it, the launcher assumes Kubernetes' default.
GRACE_SECONDS_ENV = contract.GRACE_SECONDS
DEFAULT_GRACE_SECONDS = contract.launcher_grace_seconds(contract.DEFAULT_POD_GRACE_SECONDS)

# When a worker fails the group is dead (collectives need every rank), but a checkpoint the
# training reported before the failure is still being written: the others get the grace
# period to commit it (a worker with nothing in flight exits at once), then SIGKILL.

# A worker's failure code that would read as a preemption (EXIT_PREEMPTED) is reported as this.
EXIT_FAILURE = 1

FUNCTION_WORKER_MODULE = "spotrun.train._function_worker"
SCRIPT_WORKER_MODULE = "spotrun.train._script_worker"
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
_N = TypeVar("_N", int, float)

# torchrun's environment for each worker; consumers: spotrun.train.group, torch's env:// rendezvous.
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
GROUP_RANK = "GROUP_RANK"
GROUP_WORLD_SIZE = "GROUP_WORLD_SIZE"
OMP_NUM_THREADS = "OMP_NUM_THREADS"
# How often the launcher looks for its workers' reports of silent members.
LOST_REPORT_POLL_SECONDS = 0.1

_POLL_SECONDS = 0.05


class LaunchError(RuntimeError):
    """The launch cannot start; the message says what to change."""


# --- pure: the environment of a worker and the launcher's exit code ---------------------


def worker_env(
    base: Mapping[str, str],
    pod: PodContract,
    *,
    local_rank: int,
    nproc_per_node: int,
    notice_fd: int | None = None,
) -> dict[str, str]:
    """`base` plus the torchrun-style variables of local worker `local_rank` of this pod.

    RANK = node_rank * nproc_per_node + local_rank. SPOTRUN_NPROC_PER_NODE is rewritten
    with the effective value so the worker's PodContract agrees with WORLD_SIZE.
    `notice_fd` is the notice pipe's write end (contract.NOTICE_FD), when there is one.
    """
    env = dict(base)
    env.update(
        {
            RANK: str(pod.node_rank * nproc_per_node + local_rank),
            LOCAL_RANK: str(local_rank),
            WORLD_SIZE: str(pod.replicas * nproc_per_node),
            LOCAL_WORLD_SIZE: str(nproc_per_node),
            GROUP_RANK: str(pod.node_rank),
            GROUP_WORLD_SIZE: str(pod.replicas),
            contract.NPROC_PER_NODE: str(nproc_per_node),
            contract.NODE_RANK: str(pod.node_rank),
            contract.MASTER_ADDR: pod.master_addr,
            contract.MASTER_PORT: str(pod.master_port),
        }
    )
    env.pop(contract.NOTICE_FD, None)
    if notice_fd is not None:
        env[contract.NOTICE_FD] = str(notice_fd)
    if nproc_per_node > 1:
        # As torchrun does: N workers each spinning up one OpenMP thread per core thrash.
        env.setdefault(OMP_NUM_THREADS, "1")
    return env


@dataclass(frozen=True)
class WorkerExit:
    """How one worker ended, which signals the launcher had sent it, and what it said.

    `notice_honoured`: the worker's session said, on the notice pipe, that it exits
    EXIT_PREEMPTED because its group agreed on a preemption notice (contract.NOTICE_FD).
    """

    local_rank: int
    returncode: int  # subprocess convention: -N when killed by signal N
    signals_sent: frozenset[int] = frozenset()
    notice_honoured: bool = False

    @property
    def code(self) -> int:
        """The shell's exit code: 128 + N for a worker killed by signal N."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode

    @property
    def stopped_by_launcher(self) -> bool:
        """Killed by a signal the launcher sent, and not a failure of its own."""
        return self.returncode < 0 and -self.returncode in self.signals_sent

    @property
    def preempted(self) -> bool:
        """Exited EXIT_PREEMPTED with a notice behind it.

        Either this launcher forwarded the notice (SIGTERM) to it, or its session honoured
        a notice the group agreed on (a worker on another node got it). A bare exit 75 is
        user code's own and earns nothing: counted as a preemption, it would restart a
        crashing job forever without spending its failure budget.
        """
        return self.code == contract.EXIT_PREEMPTED and (
            signal.SIGTERM in self.signals_sent or self.notice_honoured
        )

    @property
    def failed(self) -> bool:
        return self.code != 0 and not self.preempted and not self.stopped_by_launcher

    @property
    def failure_code(self) -> int:
        """The launcher's exit code for this failed worker: its own, but never EXIT_PREEMPTED."""
        return EXIT_FAILURE if self.code == contract.EXIT_PREEMPTED else self.code


def exit_code(exits: Sequence[WorkerExit], received_signal: int | None = None) -> int:
    """The launcher's exit code from its workers' exits, in the order they were seen.

    - the first worker that failed on its own: its code (128 + N if killed by signal N;
      1 for an exit 75 without a preemption notice, see `WorkerExit.preempted`);
    - else, if the launcher had to kill workers after a signal it received: 128 + that
      signal (stopped, no final checkpoint from those workers);
    - else EXIT_PREEMPTED if any worker was preempted (a mix with 0 included);
    - else 0.

    So a launcher that exits EXIT_PREEMPTED vouches for it: the supervisors (the operator,
    `spotrun run`) count that exit as a preemption without asking how it came about.
    """
    for worker in exits:
        if worker.failed:
            return worker.failure_code
    stopped = [w for w in exits if w.stopped_by_launcher]
    if stopped:
        return 128 + (received_signal if received_signal is not None else -stopped[0].returncode)
    if any(w.preempted for w in exits):
        return contract.EXIT_PREEMPTED
    return 0


def describe_exit(worker: WorkerExit) -> str:
    """How a worker ended, for the launcher's log."""
    if worker.returncode < 0:
        return f"killed by {_signal_name(-worker.returncode)} (code {worker.code})"
    if worker.code == contract.EXIT_PREEMPTED and not worker.preempted:
        return (
            f"exited with code {worker.code} without a preemption notice: a failure, not a "
            f"preemption (only a worker that got the notice, or whose group agreed on one, "
            f"is preempted); the launcher reports it as code {EXIT_FAILURE}"
        )
    return f"exited with code {worker.code}"


def worker_command(
    command: Sequence[str], function: str | None, *, warm: bool = False
) -> list[str]:
    """The argv of every worker: the user's command, or the function worker for module:fn.

    With `warm` (warm recovery), a `python script.py ...` or `python -m module ...` command
    runs through the script worker, which can run it again in the same process when the
    group re-forms; any other command runs as given (a lost member then fails it).
    """
    if command and function:
        raise LaunchError("give either a command after `--` or --function module:fn, not both")
    if function:
        if ":" not in function:
            raise LaunchError(f"--function must be module:function, got {function!r}")
        return [sys.executable, "-m", FUNCTION_WORKER_MODULE, function]
    if not command:
        raise LaunchError(
            "nothing to launch: give a command after `--` (spotrun launch -- python train.py), "
            f"--function module:fn, or set {contract.FUNCTION}"
        )
    if warm and _PYTHON.match(os.path.basename(command[0])) and len(command) > 1:
        first = command[1]
        if (first == "-m" and len(command) > 2) or not first.startswith("-"):
            return [command[0], "-m", SCRIPT_WORKER_MODULE, *command[1:]]
    return list(command)


# --- the supervisor --------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", file=sys.stderr, flush=True)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _NoticePipe:
    """The launcher's end of the notice pipe: the workers that honoured an agreed notice.

    Each worker's session writes its local rank on it just before it exits EXIT_PREEMPTED
    (contract.announce_preempted_exit); lines are shorter than PIPE_BUF, so never interleaved.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.honoured: set[int] = set()
        self._partial = b""

    def drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.read_fd, 4096)
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError):
                    self.honoured.add(int(line))

    def close_write_end(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        self.close_write_end()
        os.close(self.read_fd)


@dataclass
class _Worker:
    local_rank: int
    rank: int
    process: subprocess.Popen[bytes]
    signals_sent: set[int] = field(default_factory=set)
    exit: WorkerExit | None = None

    def send(self, signum: int) -> None:
        if self.exit is not None:
            return
        try:
            self.process.send_signal(signum)
        except ProcessLookupError:
            return
        self.signals_sent.add(signum)


class _Supervisor:
    """Waits for the workers; forwards received signals; tears the group down on a failure."""

    def __init__(self, workers: list[_Worker], grace_seconds: float, notice: _NoticePipe) -> None:
        self.workers = workers
        self.grace_seconds = grace_seconds
        self.notice = notice
        self.exits: list[WorkerExit] = []
        self.received: int | None = None
        self._pending_signals: list[int] = []
        self._deadline: float | None = None
        self._killed = False
        self._torn_down = False

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._pending_signals.append(signum)

    def run(self) -> int:
        while any(w.exit is None for w in self.workers):
            self._handle_signals()
            self._reap()
            if self._deadline_passed():
                running = self._running()
                if running:
                    _log(
                        f"deadline passed: killing {len(running)} worker(s) "
                        f"(ranks {_ranks(running)}) with SIGKILL"
                    )
                self._kill_all()
            time.sleep(_POLL_SECONDS)
        self._handle_signals()
        return exit_code(self.exits, self.received)

    def _deadline_passed(self) -> bool:
        return (
            self._deadline is not None and not self._killed and time.monotonic() >= self._deadline
        )

    def _running(self) -> list[_Worker]:
        return [w for w in self.workers if w.exit is None]

    def _handle_signals(self) -> None:
        while self._pending_signals:
            signum = self._pending_signals.pop(0)
            if self.received is None:
                self.received = signum
                running = self._running()
                _log(
                    f"received {_signal_name(signum)}: forwarding SIGTERM to {len(running)} "
                    f"worker(s) (ranks {_ranks(running)}); SIGKILL in {self.grace_seconds:g}s"
                )
                for worker in running:
                    worker.send(signal.SIGTERM)
                self._arm_deadline(self.grace_seconds)
            else:
                _log(f"received {_signal_name(signum)} again: killing the workers now")
                self._kill_all()

    def _reap(self) -> None:
        for worker in self.workers:
            if worker.exit is not None:
                continue
            returncode = worker.process.poll()
            if returncode is None:
                continue
            # After the exit was seen: what the worker wrote before it exited is there by now.
            self.notice.drain()
            worker.exit = WorkerExit(
                worker.local_rank,
                returncode,
                frozenset(worker.signals_sent),
                notice_honoured=worker.local_rank in self.notice.honoured,
            )
            self.exits.append(worker.exit)
            _log(f"worker {worker.local_rank} (rank {worker.rank}) {describe_exit(worker.exit)}")
            if worker.exit.failed and not self._torn_down:
                self._tear_down(worker)

    def _tear_down(self, failed: _Worker) -> None:
        # Also during a preemption's grace: the final checkpoint needs every rank, so once
        # one failed there is nothing left to wait for.
        self._torn_down = True
        running = self._running()
        if not running:
            return
        grace = self.grace_seconds
        _log(
            f"rank {failed.rank} failed: stopping the other worker(s) "
            f"(ranks {_ranks(running)}); SIGKILL in {grace:g}s"
        )
        for worker in running:
            if signal.SIGTERM not in worker.signals_sent:
                worker.send(signal.SIGTERM)
        self._arm_deadline(grace)

    def _arm_deadline(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        if self._deadline is None or deadline < self._deadline:
            self._deadline = deadline

    def _kill_all(self) -> None:
        for worker in self._running():
            worker.send(signal.SIGKILL)
        self._killed = True


def _ranks(workers: Sequence[_Worker]) -> str:
    return ", ".join(str(w.rank) for w in workers) or "none"


def launch(
    command: Sequence[str] = (),
    *,
    function: str | None = None,
    nproc_per_node: int | None = None,
    grace_seconds: float | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run this pod's workers to the end and return the launcher's exit code (`exit_code`).

    The pod contract comes from `env` (default os.environ); `nproc_per_node` overrides
    SPOTRUN_NPROC_PER_NODE and `grace_seconds` SPOTRUN_GRACE_SECONDS. SIGTERM and SIGINT
    are handled until it returns (the previous handlers are restored), so it must run in
    the main thread; in a larger program, run `spotrun launch` as a subprocess instead.
    """
    env = dict(os.environ if env is None else env)
    pod = PodContract.from_env(env)
    nproc = pod.nproc_per_node if nproc_per_node is None else nproc_per_node
    if nproc < 1:
        raise LaunchError(f"--nproc-per-node must be >= 1, got {nproc}")
    pool = _pool_spares(env)
    if pod.node_rank >= pod.replicas + pool:
        spares = f" and {contract.SPARES}={pool} spare pods" if pool else ""
        raise LaunchError(
            f"{contract.NODE_RANK}={pod.node_rank} is outside the group of "
            f"{contract.REPLICAS}={pod.replicas} pods{spares}; node ranks run from 0 to "
            f"replicas - 1{' + spares' if pool else ''}"
        )
    grace = _grace_seconds(env) if grace_seconds is None else grace_seconds
    warm = env.get(contract.RECOVERY) == "warm"
    if pool and not warm:
        raise LaunchError(
            f"{contract.SPARES} is set but {contract.RECOVERY} is not warm: a spare pod joins "
            "a group only through a warm recovery"
        )
    spare = _spare_slot(env)
    if spare is not None and not warm:
        raise LaunchError(
            f"{contract.SPARE} is set but {contract.RECOVERY} is not warm: a spare joins a "
            "group only through a warm recovery"
        )
    argv = worker_command(command, function if function is not None else pod.function, warm=warm)

    world = pod.replicas * nproc
    first = pod.node_rank * nproc
    if spare is None:
        _log(
            f"job {pod.namespace}/{pod.job} attempt {pod.attempt}: node {pod.node_rank} of "
            f"{pod.replicas}, {nproc} worker(s), world size {world}, "
            f"ranks {first}-{first + nproc - 1}, master {pod.master_addr}:{pod.master_port}"
        )
    else:
        _log(
            f"job {pod.namespace}/{pod.job}: warm spare {spare}, {nproc} worker(s); they "
            "import and wait until a group promotes this spare"
        )
    _log(f"command: {' '.join(argv)}")

    workers: list[_Worker] = []
    notice = _NoticePipe()
    supervisor = _Supervisor(workers, grace, notice)
    membership = _Membership(pod, nproc, env, spare=spare) if warm else None
    if membership is not None:
        env = {**env, contract.GROUP_FILE: membership.path}
        pooled = env.get(contract.ELASTIC_BATCH) or pool
        if spare is None and pooled and membership.outside_group():
            # A replica of an elastic group that re-formed without it, or a spare pod
            # (spec.spares): its workers import and wait, as a spare's do, until a group
            # names this replica (the group grows back, or a member was lost).
            env[contract.SPARE] = f"replica-{pod.node_rank}"
            membership.joining = True
            until = "a member is lost" if pool else "the group grows back to include it"
            start = "once the group trains, then " if pool else ""
            _log(
                f"replica {pod.node_rank} is not a member of attempt {pod.attempt}'s group; "
                f"its workers start {start}import and wait until {until}"
            )
        membership.start()
        if pool and membership.joining and not _hold_spare(membership):
            membership.stop()
            _log("stopped before its workers started; exiting with code 0")
            return 0
    if threading.current_thread() is not threading.main_thread():
        # Only the main thread can take signals; preexec_fn is unsafe beside other threads.
        raise LaunchError("launch() must run in the main thread of its process")
    previous = {
        signum: signal.signal(signum, supervisor.on_signal)
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        preexec = die_with_parent(os.getpid(), ignore_sigint=True)
        for local_rank in range(nproc):
            try:
                process = subprocess.Popen(
                    argv,
                    env=worker_env(
                        env,
                        pod,
                        local_rank=local_rank,
                        nproc_per_node=nproc,
                        notice_fd=notice.write_fd,
                    ),
                    preexec_fn=preexec,
                    pass_fds=(notice.write_fd,),
                )
            except OSError as err:
                _log(f"cannot start worker {local_rank}: {err}; stopping the others")
                for worker in workers:
                    worker.send(signal.SIGKILL)
                    worker.process.wait()
                return 127 if isinstance(err, FileNotFoundError) else 126
            workers.append(_Worker(local_rank, first + local_rank, process))
            rank = "spare" if spare is not None else f"rank {first + local_rank}"
            _log(f"worker {local_rank} ({rank}) started, pid {process.pid}")
        notice.close_write_end()
        code = supervisor.run()
    finally:
        notice.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if membership is not None:
            membership.stop()
    if membership is not None:
        pod = dataclasses.replace(
            pod,
            attempt=membership.attempt,
            node_rank=membership.node_rank,
            replicas=membership.replicas,
        )
    # Node 0 knows the training finished once its workers all exited 0. With warm recovery
    # every node knows: its workers passed the group's finishing barrier (Session.finish),
    # so whichever replica survives records it.
    if code == 0 and (pod.node_rank == 0 or warm):
        _record_completion(pod)
    if code == 0 and env.get(contract.HOLD_AFTER_SUCCESS) == "1":
        _log("training finished; holding until the operator stops this pod")
        _hold_until_signal()
    _log(f"exiting with code {code}")
    return code


class _Membership:
    """Follows the status for the next group of a warm recovery, and hands it to the workers.

    When the policy keeps this replica in a newer attempt, the launcher writes the group
    file its workers wait on (SPOTRUN_GROUP_FILE): they leave their broken group and join
    the new one in the same processes.
    """

    def __init__(
        self, pod: PodContract, nproc: int, env: Mapping[str, str], spare: int | None = None
    ) -> None:
        self.pod = pod
        self.nproc = nproc
        self.attempt = pod.attempt
        # The replica's identity (its pod ordinal): the policy keeps and names members by it.
        self.index = pod.node_rank
        # Its place in the current group: the index, unless an elastic group renumbered it.
        self.node_rank = pod.node_rank
        self.replicas = pod.replicas
        # A warm spare's slot until a group promotes it; then it is the member of node_rank.
        self.spare = spare
        # A replica outside its elastic group, waiting for a group that names it.
        self.joining = False
        # Where replica {index}'s rendezvous listens (rank 0 moves when an elastic group
        # re-forms without replica 0); unset: the contract's MASTER_ADDR.
        self.member_addr = env.get(contract.MEMBER_ADDR) or None
        self.folder = tempfile.mkdtemp(prefix="spotrun-group-")
        self.path = os.path.join(self.folder, "group.json")
        root = layout.job_root(pod.storage, pod.namespace, pod.job)
        self.feed = watch.feed_for(
            pod.status_sink, job_root=root, job=pod.job, namespace=pod.namespace, environ=env
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Set once the status shows the current attempt training (its lastMetrics changed
        # since this launcher first saw that attempt), or a group names this replica: when
        # a spare pod's workers may start (_hold_spare).
        self.may_start = threading.Event()
        self._metrics_at: dict[Any, Any] = {}

    def outside_group(self, timeout: float = 10.0) -> bool:
        """Whether the status says this replica's attempt formed its group without it.

        Read once, before the workers start. A group of an older attempt (a start racing
        the status write) or no status at all: a member, as always.
        """
        if self.feed is None:
            return False
        status = watch.wait_until(self.feed, lambda _: True, timeout)
        record = None if status is None else GroupRecord.from_status(status)
        if record is None or record.attempt < self.attempt:
            return False
        return record.attempt > self.attempt or record.node_rank_of(self.index) is None

    def start(self) -> None:
        # The workers' heartbeats, sent from here too: a worker whose interpreter lock is
        # held for long (a C call) stops sending its own (spotrun.membership.beats).
        threading.Thread(
            target=beats.send_beats, args=(self.path, self._stop), name="spotrun-beats", daemon=True
        ).start()
        if self.feed is None:
            _log("warm recovery: no status to follow from this pod; a lost member fails the group")
            self.may_start.set()
            return
        self._thread = threading.Thread(
            target=self.feed.follow, args=(self.on_status, self._stop), daemon=True
        )
        self._thread.start()
        threading.Thread(target=self._report_lost, daemon=True).start()

    def _report_lost(self) -> None:
        """Records in the status the members this pod's workers found silent.

        A worker whose peers on another node stopped answering (spotrun.train.liveness)
        leaves a report beside the group file; this pod's entry of status.peerReports then
        names those node ranks of its attempt, and the policy restarts without them
        (spotrun.lifecycle.peers).
        """
        sent: set[tuple[int, tuple[int, ...]]] = set()
        while not self._stop.wait(LOST_REPORT_POLL_SECONDS):
            for report in read_lost_reports(self.path):
                key = (report.attempt, report.nodes)
                if report.attempt != self.attempt or not report.nodes or key in sent:
                    continue
                nodes = ", ".join(map(str, report.nodes))
                try:
                    sink = make_sink(
                        self.pod.status_sink,
                        job_root=layout.job_root(
                            self.pod.storage, self.pod.namespace, self.pod.job
                        ),
                        attempt=report.attempt,
                        job=self.pod.job,
                        namespace=self.pod.namespace,
                    )
                    sink.peers_lost(self.index, report.nodes, time.time())
                except Exception as err:  # tried again a second later
                    _log(
                        f"could not report node(s) {nodes} of attempt {report.attempt} lost: {err}"
                    )
                    self._stop.wait(1.0)
                    continue
                sent.add(key)
                _log(
                    f"attempt {report.attempt}: its workers heard nothing from node(s) {nodes}; "
                    "reported them lost"
                )

    def on_status(self, status: Mapping[str, Any]) -> None:
        metrics = status.get("lastMetrics")
        if metrics != self._metrics_at.setdefault(status.get("attempt"), metrics):
            self.may_start.set()
        record = GroupRecord.from_status(status)
        if record is None or record.attempt <= self.attempt:
            return
        env: dict[str, str] = {}
        if self.spare is not None:
            rank = record.promotes(self.spare)
            if rank is None:
                return
            # Spawned long before: the bucket fallback is the checkpoint that is latest now.
            latest = (status.get("latestCheckpoint") or {}).get("uri")
            if latest:
                env[contract.RESUME_FROM] = str(latest)
            promoted = f"spare {self.spare} promoted to node {rank}"
            self.spare, self.index = None, record.indices[rank]
        elif self.joining:
            if record.node_rank_of(self.index) is None:
                return
            latest = (status.get("latestCheckpoint") or {}).get("uri")
            if latest:
                env[contract.RESUME_FROM] = str(latest)
            promoted = f"replica {self.index} joins the group again"
            self.joining = False
        elif record.keeps(self.index):
            promoted = ""
        else:
            return
        rank = record.node_rank_of(self.index)
        if rank is None:
            return  # kept outside the group: a spare pod that goes on waiting
        # The job's mean time between interruptions now: the next cadences' MTBF (new pods
        # get it in their environment from the operator).
        env.update(contract.observed_mtbf_env(record.mtbf_seconds))
        self.node_rank, self.replicas = rank, record.replicas
        port = record.master_port or rendezvous_port(contract.DEFAULT_MASTER_PORT, record.attempt)
        group = GroupFile(
            attempt=record.attempt,
            master_addr=self._address(record.indices[0]),
            master_port=port,
            replicas=record.replicas,
            nproc_per_node=self.nproc,
            node_rank=rank,
            env=env,
        )
        tmp = f"{self.path}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(group.to_bytes())
        os.replace(tmp, self.path)
        self.attempt = record.attempt
        self.may_start.set()
        what = promoted or "this replica is kept (warm recovery)"
        _log(
            f"attempt {record.attempt}: {what}; its workers "
            f"re-form the group at {group.master_addr}:{port}"
        )

    def _address(self, index: int) -> str:
        """Where replica `index` (the group's rank 0) listens."""
        if self.member_addr is None:
            return self.pod.master_addr
        return self.member_addr.replace("{index}", str(index))

    def stop(self) -> None:
        self._stop.set()
        shutil.rmtree(self.folder, ignore_errors=True)


def _spare_slot(env: Mapping[str, str]) -> int | None:
    return _env_number(env, contract.SPARE, int, "a spare slot number")


def _pool_spares(env: Mapping[str, str]) -> int:
    """spec.spares, from SPOTRUN_SPARES: the pods beyond the group's that wait as spares."""
    return _env_number(env, contract.SPARES, int, "a number of spare pods") or 0


def _record_completion(pod: PodContract) -> None:
    """Tells the status that the training finished, so the supervisor can mark it Succeeded."""
    root = layout.job_root(pod.storage, pod.namespace, pod.job)
    try:
        sink = make_sink(
            pod.status_sink,
            job_root=root,
            attempt=pod.attempt,
            job=pod.job,
            namespace=pod.namespace,
        )
        sink.completed(None, time.time())
    except Exception as err:  # the exit code still says success, and the supervisor sees it
        _log(f"could not record completion in the status: {err}")


def _hold_spare(membership: _Membership) -> bool:
    """A spare pod (spec.spares): waits to start its workers until the group trains.

    A spare's start (two imports of torch: its worker's and its writer's) would take the
    CPU from the group's own start, or from a promoted spare still catching up, which the
    whole group waits for. It starts at once if a group names it first (a member lost
    before it was ready: it then joins as a replacement would, its pod already running).
    False when SIGTERM or SIGINT came first (the pod is going; nothing was started).
    """
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not membership.may_start.wait(0.2):
            if stopped.is_set():
                return False
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return not stopped.is_set()


def _hold_until_signal() -> None:
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    signal.sigwait(stop)


def _grace_seconds(env: Mapping[str, str]) -> float:
    value = _env_number(env, GRACE_SECONDS_ENV, float, "a number of seconds")
    return DEFAULT_GRACE_SECONDS if value is None else value


def _env_number(
    env: Mapping[str, str], name: str, parse: Callable[[str], _N], what: str
) -> _N | None:
    """The non-negative number in `env[name]`, None when unset; a LaunchError names it."""
    raw = env.get(name)
    if not raw:
        return None
    try:
        value = parse(raw)
    except ValueError:
        raise LaunchError(f"{name} must be {what}, got {raw!r}") from None
    if value < 0:
        raise LaunchError(f"{name} must be >= 0, got {value:g}")
    return value


# --- the `spotrun launch` subcommand ---------------------------------------------------

HELP = "start this pod's workers and supervise them (the pod's main process)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `spotrun launch`."""
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help=f"workers in this pod (default: ${contract.NPROC_PER_NODE}, else 1)",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=None,
        metavar="S",
        help=(
            "after a SIGTERM, how long the workers get to checkpoint and exit before "
            f"SIGKILL (default: ${GRACE_SECONDS_ENV}, else {DEFAULT_GRACE_SECONDS:g})"
        ),
    )
    parser.add_argument(
        "--function",
        default=None,
        metavar="MODULE:FN",
        help=(
            f"call FN(config) in every worker instead of a command (default: ${contract.FUNCTION})"
        ),
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="the worker command, after `--` (e.g. -- python train.py --lr 0.1)",
    )


def main(args: argparse.Namespace) -> int:
    """Run `spotrun launch` from parsed arguments; returns the exit code."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        return launch(
            command,
            function=args.function,
            nproc_per_node=args.nproc_per_node,
            grace_seconds=args.grace_seconds,
        )
    except (LaunchError, contract.ContractError) as err:
        _log(f"error: {err}")
        return 2
