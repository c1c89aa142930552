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
from spotrun.train.cadence import Cadence
from spotrun.train.checkpoint import Checkpoint, _Committed
from spotrun.train.writer import WriterClient, WriterConfig

log = logging.getLogger("spotrun")

PROGRESS_INTERVAL_SECONDS = float(
    os.environ.get(pod.PROGRESS_SECONDS, str(pod.LONGEST_PROGRESS_SECONDS))
)


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
        self._closed = False

        if world_size > 1 and not dist.is_initialized():
            from spotrun.train import group

            group.init_process_group()
        self._next_seq, self._resume, problems = self._agree_on_start()
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
            ),
            background=self.settings.async_save,
        )
        if problems and rank == 0:
            message = "resumed from an earlier checkpoint: " + "; ".join(problems)
            log.error(message)
            self.writer.submit("corrupt", detached=True, message=message, time=time.time())
        self._install_notice_handler()
        self._failing = False
        self._chain_excepthook()
        atexit.register(self.close)

    # --- start-up agreement ------------------------------------------------------------------

    def _agree_on_start(self) -> tuple[int, _Committed | None, list[str]]:
        """Rank 0 picks the next sequence number and the verified resume point; all follow it."""
        rank = self.context.world_rank
        verified: Verified | None = None
        info: dict[str, Any] = {}
        if rank == 0:
            highest = self.store.highest_seq()
            info = {
                "next_seq": 0 if highest is None else highest + 1,
                "resume": None,
                "problems": [],
            }
            if self.contract.resume_from:
                root, seq = split_uri(self.contract.resume_from)
                store = self.store if root == self.root else CheckpointStore(root)
                verified, info["problems"] = store.resolve(seq)
                info["resume"] = verified.uri
        if self.context.world_size > 1:
            box = [info]
            dist.broadcast_object_list(box, src=0)
            info = box[0]
        committed = None
        if info["resume"]:
            root, seq = split_uri(info["resume"])
            store = self.store if root == self.root else CheckpointStore(root)
            if verified is None:
                manifest, sha = store.read_manifest(seq)
                verified = Verified(uri=info["resume"], manifest=manifest, manifest_sha256=sha)
            committed = _Committed(store, verified, rank, self.context.world_size)
            log.info(
                "rank %d resumes from %s (step %d)", rank, verified.uri, verified.manifest.step
            )
        return int(info["next_seq"]), committed, list(info["problems"])

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
        flags[1 + rank] = 1.0 if checkpoint is not None else 0.0
        agreed = self._all_reduce(flags)
        notice = agreed[0] > 0 or (self._agreed_step == self._step and self._agreed_notice)
        writers = [r for r in range(world) if agreed[1 + r] > 0]

        raw_step = metrics.get("step")
        step = (
            raw_step if isinstance(raw_step, int) and not isinstance(raw_step, bool) else self._step
        )
        self._step = step + 1
        now = time.time()

        if writers:
            self._save(step, dict(metrics), checkpoint, writers, now)
            self.cadence.observe(time.monotonic() - started, time.monotonic())
        elif rank == 0 and now - self._last_progress >= PROGRESS_INTERVAL_SECONDS:
            self._last_progress = now
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
                log.warning("rank %d: preemption notice honoured at step %d; exiting", rank, step)
                pod.announce_preempted_exit(self.context.local_rank)
                raise SystemExit(pod.EXIT_PREEMPTED)

    def _save(
        self,
        step: int,
        metrics: dict[str, Any],
        checkpoint: Checkpoint | None,
        writers: list[int],
        now: float,
    ) -> None:
        rank = self.context.world_rank
        seq = self._next_seq
        self._next_seq += 1
        kind: CheckpointKind
        if checkpoint is not None and checkpoint._sharded is not None:
            kind = "dcp"
            from spotrun.store import sharded

            written = sharded.save(self.store.uri(seq), checkpoint._sharded, rank)
            self._pending.append(self.writer.submit("record_files", seq=seq, paths=written))
        elif checkpoint is not None and checkpoint._directory is not None:
            kind = "directory"
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
            if self.settings.keep_all_ranks:
                kind = "per-rank"
                mine = dict(enumerate(tensors))
                job = self.writer.save(seq, kind, skeleton, mine)
            else:
                kind = "replicated"
                parts = partition([nbytes(t) for t in tensors], writers)
                mine = {i: tensors[i] for i in parts[rank]}
                job = self.writer.save(seq, kind, skeleton if rank == writers[0] else None, mine)
            if not self.writer.background:
                self._pending.append(job)
        else:
            kind = "per-rank" if self.settings.keep_all_ranks else "replicated"
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

    def flush(self) -> None:
        """Waits until every save this rank started is written (and on rank 0, committed)."""
        self.writer.drain_save()
        pending, self._pending = self._pending, []
        for job in pending:
            self.writer.wait(job)

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
            self.writer.close(timeout=0)
            return
        try:
            self.flush()
        except Exception as err:
            log.error(
                "rank %d: a checkpoint did not finish before exit: %s", self.context.world_rank, err
            )
        self.writer.close()


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
