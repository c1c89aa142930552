"""One training process's spotrun session: its place in the group, its checkpoints, its notices.

`report()`, `get_checkpoint()`, `should_checkpoint()` and `get_context()` are methods of the
process-wide session created on first use from the pod contract. The session agrees with
the other ranks (one all-reduce per report) on which ranks pass a checkpoint and whether a
preemption notice arrived, hands snapshots to its writer process, and on a notice commits
a final checkpoint and exits with EXIT_PREEMPTED.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Protocol

import torch
import torch.distributed as dist

from spotrun import contract as pod
from spotrun.store import layout
from spotrun.store.commit import CheckpointStore, Verified, split_uri
from spotrun.store.manifest import CheckpointKind
from spotrun.store.tree import flatten, nbytes, partition
from spotrun.train import resume
from spotrun.train.cadence import Cadence
from spotrun.train.checkpoint import Checkpoint, _Committed
from spotrun.train.resume import ResumeChoice
from spotrun.train.writer import WriterClient, WriterConfig

log = logging.getLogger("spotrun")

PROGRESS_INTERVAL_SECONDS = float(os.environ.get("SPOTRUN_PROGRESS_SECONDS", "10"))


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class TrainContext:
    """Where this process stands: ranks, sizes, attempt and the job's config."""

    world_rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    attempt: int
    job: str
    namespace: str
    storage: str
    config: Mapping[str, Any] = field(default_factory=dict)

    # Ray Train's spelling, so its users find what they know.
    def get_world_rank(self) -> int:
        return self.world_rank

    def get_local_rank(self) -> int:
        return self.local_rank

    def get_world_size(self) -> int:
        return self.world_size

    def get_node_rank(self) -> int:
        return self.node_rank


class Session:
    def __init__(
        self,
        contract: pod.PodContract,
        rank: int,
        local_rank: int,
        world_size: int,
        local_world_size: int,
    ) -> None:
        storage = layout.resolve_storage(contract.storage)
        self.contract = contract
        self.context = TrainContext(
            world_rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            local_world_size=local_world_size,
            node_rank=contract.node_rank,
            attempt=contract.attempt,
            job=contract.job,
            namespace=contract.namespace,
            storage=storage,
            config=dict(contract.config),
        )
        self.root = layout.job_root(storage, contract.namespace, contract.job)
        self.store = CheckpointStore(self.root)
        self.settings = contract.checkpoint
        self.cadence = Cadence(mtbf_seconds=float(os.environ.get("SPOTRUN_MTBF_SECONDS", "3600")))
        self._notice = False
        self._notice_offered = False
        self._agreed_step: int | None = None
        self._agreed_notice = False
        self._pending: list[int] = []
        self._stateful: dict[str, Stateful] = {}
        self._last_progress = 0.0
        self._last_report: tuple[dict[str, Any], int, float] | None = None
        self._recorded_step: int | None = None
        self._closed = False

        if world_size > 1 and not dist.is_initialized():
            from spotrun.train import group

            group.init_process_group()
        self._next_seq, self._resume, choice = self._agree_on_start()
        self._first_seq = self._next_seq
        self._step = self._resume.verified.manifest.step + 1 if self._resume else 0
        resumed_state = self._resume.verified.manifest.runtime if self._resume else {}
        self._resumed_stateful: dict[str, Any] = dict(resumed_state.get("stateful", {}))

        self.writer = WriterClient(
            WriterConfig(
                root=self.root,
                rank=rank,
                attempt=contract.attempt,
                world_size=world_size,
                job=contract.job,
                namespace=contract.namespace,
                settings=self.settings,
                sink=contract.status_sink,
                first_seq=self._next_seq,
                resumed_seq=(
                    self._resume.verified.manifest.seq
                    if self._resume and self._resume.store.root == self.root
                    else None
                ),
                corrupt=tuple(
                    split_uri(uri)[1]
                    for uri, _ in (choice.corrupt if choice else ())
                    if split_uri(uri)[0] == self.root
                ),
            ),
            background=self.settings.async_save,
        )
        if rank == 0 and choice is not None and (choice.corrupt or choice.rediscovered):
            self._repair_ledger(choice)
        self._install_notice_handler()
        self._failing = False
        self._chain_excepthook()
        atexit.register(self.close)

    # --- start-up agreement ------------------------------------------------------------------

    def _agree_on_start(self) -> tuple[int, _Committed | None, ResumeChoice | None]:
        """Rank 0 picks the next sequence number and the verified resume point; all follow it."""
        rank = self.context.world_rank
        choice: ResumeChoice | None = None
        info: dict[str, Any] = {}
        if rank == 0:
            highest = self.store.highest_seq()
            choice = resume.choose(self.store, self.contract.resume_from)
            info = {
                "next_seq": 0 if highest is None else highest + 1,
                "resume": choice.verified.uri if choice.verified else None,
            }
        if self.context.world_size > 1:
            box = [info]
            dist.broadcast_object_list(box, src=0)
            info = box[0]
        committed = None
        if info["resume"]:
            root, seq = split_uri(info["resume"])
            store = self.store if root == self.root else CheckpointStore(root)
            if choice is not None and choice.verified is not None:
                verified = choice.verified
            else:
                manifest, sha = store.read_manifest(seq)
                verified = Verified(uri=info["resume"], manifest=manifest, manifest_sha256=sha)
            committed = _Committed(store, verified, rank, self.context.world_size)
            log.info(
                "rank %d resumes from %s (step %d)", rank, verified.uri, verified.manifest.step
            )
        return int(info["next_seq"]), committed, choice

    def _repair_ledger(self, choice: ResumeChoice) -> None:
        """Moves the status to the checkpoint this attempt really resumes from, and says why.

        Waited for: checkpoints this attempt commits are fenced against the ledger's latest,
        so the ledger must name the resume point first.
        """
        message = choice.message()
        log.error("rank 0: %s", message)
        verified = choice.verified
        job = self.writer.submit(
            "resumed",
            uri=verified.uri if verified else None,
            replaced=choice.named if choice.fell_back else None,
            corrupt=[uri for uri, _ in choice.corrupt],
            reason="FellBack" if choice.corrupt else "Rediscovered",
            message=message,
            time=time.time(),
        )
        try:
            self.writer.wait(job, timeout=120)
        except Exception as err:  # the run goes on; a later commit records the newer state
            log.error("rank 0: could not repair the status: %s", err)

    # --- notices ----------------------------------------------------------------------------

    def _install_notice_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_notice(signum: int, frame: FrameType | None) -> None:
            self._notice = True
            log.warning(
                "rank %d: preemption notice (signal %d); checkpointing at the next report",
                self.context.world_rank,
                signum,
            )

        signal.signal(signal.SIGTERM, on_notice)

    def _chain_excepthook(self) -> None:
        """Marks the session failing on an uncaught exception, so exit does not wait on commits
        that need ranks which are probably gone too."""
        previous = sys.excepthook

        def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
            self._failing = True
            previous(kind, value, tb)

        sys.excepthook = hook

    def notice_preemption(self) -> None:
        self._notice = True

    def _all_reduce(self, values: list[float]) -> list[float]:
        if self.context.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [float(v) for v in tensor.tolist()]

    # --- the training API ----------------------------------------------------------------------

    def get_checkpoint(self) -> Checkpoint | None:
        return Checkpoint(committed=self._resume) if self._resume else None

    def register_stateful(self, name: str, obj: Stateful) -> None:
        self._stateful[name] = obj
        if name in self._resumed_stateful:
            obj.load_state_dict(self._resumed_stateful[name])

    def should_checkpoint(self) -> bool:
        """Whether every rank should pass a checkpoint at this step's report (a collective)."""
        due = 1.0 if self.context.world_rank == 0 and self.cadence.due(time.monotonic()) else 0.0
        notice, agreed_due = self._all_reduce([1.0 if self._notice else 0.0, due])
        self._agreed_step, self._agreed_notice = self._step, notice > 0
        if notice > 0:
            self._notice_offered = True
        return notice > 0 or agreed_due > 0

    def report(self, metrics: Mapping[str, Any], checkpoint: Checkpoint | None = None) -> None:
        started = time.monotonic()
        self._pending = [job for job in self._pending if not self.writer.collect(job)]
        rank, world = self.context.world_rank, self.context.world_size
        flags = [1.0 if self._notice else 0.0] + [0.0] * world
        flags[1 + rank] = float(_KIND_CODES[_kind_of(checkpoint)]) if checkpoint else 0.0
        agreed = self._all_reduce(flags)
        notice = agreed[0] > 0 or (self._agreed_step == self._step and self._agreed_notice)
        writers = [r for r in range(world) if agreed[1 + r] > 0]
        kind = _agreed_kind(
            {r: int(agreed[1 + r]) for r in writers}, world, self.settings.keep_all_ranks
        )

        # spotrun's own count of reports: it orders checkpoints and resumes, whatever the
        # training code reports (a metric named "step" is a metric like any other).
        step = self._step
        self._step = step + 1
        now = time.time()
        self._last_report = (dict(metrics), step, now)

        if writers:
            assert kind is not None
            self._save(step, dict(metrics), checkpoint, writers, kind, now)
            self.cadence.observe(time.monotonic() - started, time.monotonic())
            self._recorded_step = step
        elif rank == 0 and now - self._last_progress >= PROGRESS_INTERVAL_SECONDS:
            self._last_progress = now
            self._recorded_step = step
            self.writer.submit(
                "progress", detached=True, metrics=dict(metrics), step=step, time=now
            )

        if notice:
            # Exit once the group committed this step's checkpoint, or once the training code
            # was offered one (should_checkpoint() said True) and declined. Until then keep
            # training: the next checkpointing report, inside the grace period, saves the work.
            self._notice = True
            if writers or self._notice_offered:
                self.flush()
                self._record_last_metrics()
                log.warning("rank %d: preemption notice honoured at step %d; exiting", rank, step)
                raise SystemExit(pod.EXIT_PREEMPTED)

    def _save(
        self,
        step: int,
        metrics: dict[str, Any],
        checkpoint: Checkpoint | None,
        writers: list[int],
        kind: CheckpointKind,
        now: float,
    ) -> None:
        rank = self.context.world_rank
        seq = self._next_seq
        self._next_seq += 1
        if checkpoint is not None and checkpoint._sharded is not None:
            from spotrun.store import sharded

            written = sharded.save(self.store.uri(seq), checkpoint._sharded, rank)
            self._pending.append(self.writer.submit("record_files", seq=seq, paths=written))
        elif checkpoint is not None and checkpoint._directory is not None:
            staging = tempfile.mkdtemp(prefix="spotrun-stage-")
            shutil.copytree(checkpoint._directory, staging, dirs_exist_ok=True)
            files = {
                f"{layout.shard_dir_name(rank)}/{os.path.relpath(os.path.join(d, n), staging)}": os.path.join(
                    d, n
                )
                for d, _, names in os.walk(staging)
                for n in names
            }
            self._pending.append(
                self.writer.submit("save_files", seq=seq, files=files, staging=staging)
            )
        elif checkpoint is not None:
            data = checkpoint.to_dict()
            skeleton, tensors = flatten(data)
            if kind == "per-rank":
                mine = dict(enumerate(tensors))
                job = self.writer.save(seq, kind, skeleton, mine)
            else:
                parts = partition([nbytes(t) for t in tensors], writers)
                mine = {i: tensors[i] for i in parts[rank]}
                job = self.writer.save(seq, kind, skeleton if rank == writers[0] else None, mine)
            if not self.writer.background:
                self._pending.append(job)
        if rank == 0:
            runtime = {"stateful": {name: obj.state_dict() for name, obj in self._stateful.items()}}
            self._pending.append(
                self.writer.submit(
                    "commit",
                    seq=seq,
                    step=step,
                    kind=kind,
                    writers=writers,
                    metrics=metrics,
                    runtime=runtime,
                    time_=now,
                )
            )
        if not self.settings.async_save:
            self.flush()

    def flush(self, timeout: float | None = None) -> None:
        """Waits until every save this rank started is written (and on rank 0, committed)."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        self.writer.drain_save(left())
        pending, self._pending = self._pending, []
        for job in pending:
            self.writer.wait(job, left())

    def _record_last_metrics(self, timeout: float | None = None) -> None:
        """Rank 0: the status's lastMetrics becomes the last report, if progress was throttled."""
        if self.context.world_rank != 0 or self._last_report is None:
            return
        metrics, step, now = self._last_report
        if self._recorded_step == step:
            return
        self._recorded_step = step
        job = self.writer.submit("progress", metrics=metrics, step=step, time=now)
        try:
            self.writer.wait(job, timeout)
        except Exception as err:  # a status write is not worth failing the exit for
            log.warning("rank 0: could not record the last metrics: %s", err)

    def finish(self) -> None:
        """The training function returned: flush and stop the writer.

        Completion is recorded by the launcher of node 0 once all its workers exited 0, so a
        script and a function finish the same way.
        """
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._failing:
            # A checkpoint the code reported before it failed is still committed and recorded,
            # within a bound: ranks that died with it would otherwise hold the exit forever.
            bound = _failure_flush_seconds()
            log.error(
                "rank %d: the training failed; committing what it reported first (up to %gs)",
                self.context.world_rank,
                bound,
            )
            try:
                self.flush(timeout=bound)
                self._record_last_metrics(timeout=5)
            except Exception as err:
                log.error(
                    "rank %d: the checkpoint reported before the failure was not committed: %s",
                    self.context.world_rank,
                    err,
                )
            self.writer.close(timeout=5)
            return
        try:
            self.flush()
            self._record_last_metrics()
        except Exception as err:
            log.error(
                "rank %d: a checkpoint did not finish before exit: %s", self.context.world_rank, err
            )
        self.writer.close()


class CheckpointKindError(ValueError):
    """The ranks passed different kinds of checkpoint to the same report()."""


_KIND_CODES: dict[str, int] = {"dict": 1, "directory": 2, "dcp": 3}
_KIND_NAMES = {code: name for name, code in _KIND_CODES.items()}


def _kind_of(checkpoint: Checkpoint | None) -> str:
    if checkpoint is None:
        return "none"
    if checkpoint._sharded is not None:
        return "dcp"
    if checkpoint._directory is not None:
        return "directory"
    return "dict"


def _agreed_kind(
    codes: Mapping[int, int], world: int, keep_all_ranks: bool
) -> CheckpointKind | None:
    """The checkpoint kind of one report, from what each writing rank passed (rank -> code).

    Any rank may carry the checkpoint (rank 0 passing None is fine), but all that carry one
    must carry the same kind; a sharded one is saved collectively, so every rank passes it.
    """
    if not codes:
        return None
    kinds = sorted({_KIND_NAMES[c] for c in codes.values()})
    if len(kinds) > 1:
        by_kind = {k: [r for r, c in codes.items() if _KIND_NAMES[c] == k] for k in kinds}
        raise CheckpointKindError(
            "the ranks passed different kinds of checkpoint to the same report(): "
            + ", ".join(f"{k} from ranks {v}" for k, v in by_kind.items())
            + "; pass one kind (Checkpoint.from_dict, from_directory or from_sharded_state_dict)"
            " from every rank that passes one"
        )
    kind = kinds[0]
    if kind == "dcp":
        if len(codes) != world:
            missing = sorted(set(range(world)) - set(codes))
            raise CheckpointKindError(
                f"a sharded checkpoint is saved by every rank together, but ranks {missing} "
                "passed none to this report(); pass Checkpoint.from_sharded_state_dict from all"
            )
        return "dcp"
    if kind == "directory":
        return "directory"
    return "per-rank" if keep_all_ranks else "replicated"


def _failure_flush_seconds() -> float:
    """How long a failing worker waits for its reported checkpoint: inside the launcher's grace."""
    try:
        grace = float(os.environ.get("SPOTRUN_GRACE_SECONDS", "25"))
    except ValueError:
        grace = 25.0
    return max(1.0, grace - 3.0)


_session: Session | None = None
_lock = threading.Lock()


def get_session() -> Session:
    global _session
    with _lock:
        if _session is None:
            env: dict[str, str] = dict(os.environ)
            if not env.get(pod.JOB) and not env.get("WORLD_SIZE"):
                # A bare `python train.py`: one process, a job named after nothing in particular.
                env = {**env, pod.JOB: "local"}
            contract = pod.PodContract.from_env(env)
            _session = Session(
                contract,
                rank=int(env.get("RANK", "0")),
                local_rank=int(env.get("LOCAL_RANK", "0")),
                world_size=int(env.get("WORLD_SIZE", "1")),
                local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
            )
        return _session


def report(metrics: Mapping[str, Any], checkpoint: Checkpoint | None = None) -> None:
    """Reports this step's metrics, and optionally a checkpoint, like ray.train.report."""
    get_session().report(metrics, checkpoint)


def get_checkpoint() -> Checkpoint | None:
    """The checkpoint this run resumes from (verified), or None on a fresh start."""
    return get_session().get_checkpoint()


def get_context() -> TrainContext:
    return get_session().context


def should_checkpoint() -> bool:
    """True when this step should pass a checkpoint: a preemption notice, or the interval is due."""
    return get_session().should_checkpoint()
