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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Protocol

import torch
import torch.distributed as dist

from spotrun import contract as pod
from spotrun.ledger.status import in_memory, restored_from
from spotrun.membership.groupfile import GroupFile, LostReport, write_lost_report
from spotrun.store import layout
from spotrun.store.commit import CheckpointStore, Verified, split_uri
from spotrun.store.manifest import CheckpointKind
from spotrun.store.tree import flatten, nbytes, partition, unflatten
from spotrun.train import group as process_group
from spotrun.train import liveness, regroup, resume
from spotrun.train.cadence import Cadence, mtbf_seconds
from spotrun.train.checkpoint import Checkpoint, _Committed
from spotrun.train.regroup import MemorySnapshot
from spotrun.train.resume import ResumeChoice
from spotrun.train.writer import SaveAbandoned, WriterClient, WriterConfig

log = logging.getLogger("spotrun")

PROGRESS_INTERVAL_SECONDS = float(
    os.environ.get(pod.PROGRESS_SECONDS, str(pod.LONGEST_PROGRESS_SECONDS))
)
# The shortest interval between snapshots kept only in memory (the memory tier's Young/Daly
# floor): a copy of the state into this process's memory, with no upload and no commit.
MEMORY_FLOOR_SECONDS = 0.1


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
        carried: MemorySnapshot | None = None,
        reached: int | None = None,
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
        mtbf, source = mtbf_seconds()
        if rank == 0:  # the lead: its cadences decide when the group checkpoints
            # Shown like the attempt's other lines (the workers' log has no handler of its
            # own: warnings reach stderr): once an attempt, what its checkpoints are paced by.
            log.warning("rank 0: the checkpoint cadences assume an MTBF of %gs (%s)", mtbf, source)
        # Two tiers, two cadences: checkpoints to the bucket, and between them (warm groups
        # with background saves) snapshots of the whole state kept only in memory, which a
        # warm recovery resumes from. Each interval is Young/Daly's from its own cost.
        self.cadence = Cadence(mtbf_seconds=mtbf)
        self.memory_cadence = Cadence(mtbf_seconds=mtbf, floor_seconds=MEMORY_FLOOR_SECONDS)
        self._notice = False
        self._notice_offered = False
        self._agreed_step: int | None = None
        self._agreed_notice = False
        self._agreed_memory_only = False
        self._recorded_memory: tuple[int, bool] | None = None
        self._pending: list[int] = []
        self._stateful: dict[str, Stateful] = {}
        self._last_progress = 0.0
        self._last_report: tuple[dict[str, Any], int, float] | None = None
        self._recorded_step: int | None = None
        self._closed = False
        self._own_notice = False
        # A warm recovery's launcher can regroup this worker: keep whole snapshots in memory.
        # An elastic group may shrink to one worker and grow again, so it stays warm alone.
        self.elastic = bool(os.environ.get(pod.ELASTIC_BATCH))
        self.warm = regroup.warm_enabled() and (world_size > 1 or self.elastic)
        self._resize = regroup.NextGroupProbe(contract.attempt) if self.warm else None
        self._resize_offered = False
        self._agreed_resize = False
        # Snapshots kept only in memory need a warm group (someone to serve them to) and the
        # writer process's buffers (background saves).
        self.memory_tier = self.warm and contract.checkpoint.async_save
        # The newest complete snapshot of the whole state in this process (warm only).
        self.memory: MemorySnapshot | None = None
        self._from_memory: MemorySnapshot | None = None
        # The newest step a member reported in the group before this one (survivors know
        # theirs): the steps a warm recovery lost are counted from it (status.restoredFrom).
        self._reached = reached

        if world_size > 1 and not dist.is_initialized():
            # A warm group's rendezvous may be given up: the policy formed a newer group
            # without the member this one waits for (an elastic group shrank, a spare took
            # the place of a replacement that cannot start). The worker then joins that
            # group instead of waiting here for the collective timeout.
            probe = self._resize
            try:
                process_group.init_process_group(abandon=None if probe is None else probe.published)
            except process_group.RendezvousAbandoned as err:
                raise regroup.Regroup(str(err)) from err
        agreed = self._agree_in_memory(carried) if self.warm else None
        choice: ResumeChoice | None = None
        if agreed is not None:
            self._next_seq, self._from_memory = agreed
            self.memory = self._from_memory
            self._resume = None
            self._step = self._from_memory.step + 1
            resumed_state: Mapping[str, Any] = self._from_memory.runtime
        else:
            self._next_seq, self._resume, choice = self._agree_on_start()
            self._step = self._resume.verified.manifest.step + 1 if self._resume else 0
            resumed_state = self._resume.verified.manifest.runtime if self._resume else {}
        self._first_seq = self._next_seq
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
                    else (
                        self._from_memory.seq
                        if self._from_memory and self._from_memory.seq >= 0
                        else None
                    )
                ),
                corrupt=tuple(
                    split_uri(uri)[1]
                    for uri, _ in (choice.corrupt if choice else ())
                    if split_uri(uri)[0] == self.root
                ),
            ),
            background=self.settings.async_save,
            standby=self.warm,
        )
        if rank == 0 and choice is not None and (choice.corrupt or choice.rediscovered):
            self._repair_ledger(choice)
        if rank == 0:
            self._record_restored()
        self._install_notice_handler()
        self._failing = False
        self._peers: liveness.PeerWatch | None = None
        self._chain_excepthook()
        # A warm group's members watch each other: one that stops answering (its node gone
        # without notice) is reported to the control plane instead of waited for.
        self._peers = self._watch_peers() if self.warm and world_size > 1 else None
        atexit.register(self.close)

    def _watch_peers(self) -> liveness.PeerWatch | None:
        timeout = liveness.peer_timeout()
        group_file = os.environ.get(regroup.GROUP_FILE_ENV, "")
        attempt, local_rank = self.contract.attempt, self.context.local_rank

        def on_lost(nodes: tuple[int, ...]) -> None:
            try:
                write_lost_report(group_file, local_rank, LostReport(attempt, nodes))
            except OSError as err:
                log.error("rank %d: could not tell the launcher: %s", self.context.world_rank, err)
            # The collective this worker waits in (if any) fails now; it waits for the group
            # the policy forms without the silent members.
            process_group.abort_connections()

        return liveness.start_watch(
            dist.distributed_c10d._get_default_store(),
            rank=self.context.world_rank,
            world=self.context.world_size,
            nproc_per_node=self.context.local_world_size,
            timeout=timeout,
            on_lost=on_lost,
            beats_for=(group_file, local_rank) if group_file else None,
        )

    def _stop_watching(self) -> None:
        if self._peers is not None:
            self._peers.stop()
            self._peers = None

    # --- start-up agreement ------------------------------------------------------------------

    def _agree_in_memory(self, carried: MemorySnapshot | None) -> tuple[int, MemorySnapshot] | None:
        """A warm start: the newest snapshot any member holds in memory, sent to those without it.

        Every rank says which snapshot it holds (survivors of a warm recovery carry theirs);
        the lowest rank holding the newest sends it to the others. None when no member holds
        one (a cold start, or only replacements): then the bucket is the source.
        """
        rank, world = self.context.world_rank, self.context.world_size
        highest = self.store.highest_seq() if rank == 0 else None
        mine = regroup.Holding(
            step=carried.step if carried else -1,
            seq=carried.seq if carried else -1,
            highest_seq=max(-1 if highest is None else highest, carried.seq if carried else -1),
            reached=-1 if self._reached is None else self._reached,
        )
        holdings = regroup.gather_holdings(mine, world)
        reached = max(h.reached for h in holdings)
        self._reached = reached if reached >= 0 else None
        chosen = regroup.choose_source(holdings)
        if chosen is None:
            return None
        source, needy = chosen
        started = time.monotonic()
        if rank == source:
            assert carried is not None
            regroup.send_snapshot(carried, needy)
            snapshot = carried
        elif rank in needy:
            snapshot = regroup.receive_snapshot(source)
        else:
            assert carried is not None
            snapshot = carried
        next_seq = max(h.highest_seq for h in holdings) + 1
        if rank in needy or rank == source:
            log.warning(
                "rank %d: state of step %d %s in %.2fs (%d bytes)",
                rank,
                snapshot.step,
                f"from rank {source}'s memory" if rank != source else f"sent to ranks {needy}",
                time.monotonic() - started,
                snapshot.size,
            )
        log.warning("rank %d resumes from memory at step %d", rank, snapshot.step)
        return next_seq, snapshot

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

    def _record_restored(self) -> None:
        """Rank 0 tells the ledger which tier this attempt's state came from (if any)."""
        seq: int | None
        if self._from_memory is not None:
            snapshot = self._from_memory
            tier, step, uri = "memory", snapshot.step, None
            seq = snapshot.seq if snapshot.in_bucket else None
        elif self._resume is not None:
            manifest = self._resume.verified.manifest
            tier, step, seq, uri = "bucket", manifest.step, manifest.seq, self._resume.verified.uri
        else:
            return
        restored = restored_from(
            tier,
            step=step,
            seq=seq,
            attempt=self.contract.attempt,
            uri=uri,
            time=time.time(),
            reached=self._reached,
        )
        self.writer.submit("restored", detached=True, restored=restored)

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
            self._own_notice = True
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
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        except RuntimeError as err:
            if self.warm and regroup.is_group_failure(err):
                raise regroup.Regroup(f"the group lost a member: {err}") from err
            raise
        return [float(v) for v in tensor.tolist()]

    # --- the training API ----------------------------------------------------------------------

    def get_checkpoint(self) -> Checkpoint | None:
        if self._from_memory is not None:
            snapshot = self._from_memory
            # Copies: the training code may keep these tensors (an optimizer does), and the
            # snapshot's buffer must stay as it is in case it is served again.
            tensors = snapshot.tensors(copy=True)
            return Checkpoint.served_from_memory(
                unflatten(snapshot.skeleton, tensors.__getitem__),
                uri=self.store.uri(snapshot.seq) if snapshot.in_bucket else None,
                step=snapshot.step,
                metrics=snapshot.metrics,
            )
        return Checkpoint(committed=self._resume) if self._resume else None

    @property
    def noticed(self) -> bool:
        """Whether this process itself received a preemption notice (SIGTERM)."""
        return self._own_notice

    def stateful_count(self, prefix: str) -> int:
        """How many stateful objects named `prefix...` this session holds (the next number)."""
        return sum(1 for name in self._stateful if name.startswith(prefix))

    def register_stateful(self, name: str, obj: Stateful) -> None:
        self._stateful[name] = obj
        if name in self._resumed_stateful:
            obj.load_state_dict(self._resumed_stateful[name])

    def should_checkpoint(self) -> bool:
        """Whether every rank should pass a checkpoint at this step's report (a collective).

        True on a preemption notice, when the checkpoint interval is due, when the group is
        about to be resized (its next group is published): it re-forms at this checkpoint,
        and in a warm group when the memory tier's interval is due. A checkpoint passed for
        that reason alone is kept in memory only (every member's whole state, which a warm
        recovery resumes from); the others go to the bucket as well.
        """
        now = time.monotonic()
        lead = self.context.world_rank == 0
        due = 1.0 if lead and self.cadence.due(now) else 0.0
        memory_due = 1.0 if lead and self.memory_tier and self.memory_cadence.due(now) else 0.0
        notice, agreed_due, resize, agreed_memory = self._all_reduce(
            [1.0 if self._notice else 0.0, due, self._resize_flag(), memory_due]
        )
        self._agreed_step, self._agreed_notice = self._step, notice > 0
        self._agreed_resize = resize > 0
        bucket = notice > 0 or agreed_due > 0 or resize > 0
        self._agreed_memory_only = agreed_memory > 0 and not bucket
        if notice > 0:
            self._notice_offered = True
        if resize > 0:
            self._resize_offered = True
        return bucket or agreed_memory > 0

    def _resize_flag(self) -> float:
        """1.0 when this rank's launcher published a next group while this one still runs."""
        return 1.0 if self._resize is not None and self._resize.published() else 0.0

    def report(self, metrics: Mapping[str, Any], checkpoint: Checkpoint | None = None) -> None:
        started = time.monotonic()
        self._pending = [job for job in self._pending if not self.writer.collect(job)]
        rank, world = self.context.world_rank, self.context.world_size
        flags = [1.0 if self._notice else 0.0] + [0.0] * world + [self._resize_flag()]
        flags[1 + rank] = float(_KIND_CODES[_kind_of(checkpoint)]) if checkpoint else 0.0
        agreed = self._all_reduce(flags)
        notice = agreed[0] > 0 or (self._agreed_step == self._step and self._agreed_notice)
        resize = agreed[-1] > 0 or (self._agreed_step == self._step and self._agreed_resize)
        writers = [r for r in range(world) if agreed[1 + r] > 0]
        kind = _agreed_kind(
            {r: int(agreed[1 + r]) for r in writers}, world, self.settings.keep_all_ranks
        )
        # Every rank decides alike, from agreed values only: this step goes to memory only.
        memory_only = (
            self._agreed_memory_only
            and self._agreed_step == self._step
            and not notice
            and not resize
            and kind == "replicated"
        )

        # spotrun's own count of reports: it orders checkpoints and resumes, whatever the
        # training code reports (a metric named "step" is a metric like any other).
        step = self._step
        self._step = step + 1
        now = time.time()
        self._last_report = (dict(metrics), step, now)

        if writers and memory_only:
            if checkpoint is not None:
                self._keep_only_in_memory(step, dict(metrics), checkpoint)
            self.memory_cadence.observe(time.monotonic() - started, time.monotonic())
        elif writers:
            assert kind is not None
            self._save(step, dict(metrics), checkpoint, writers, kind, now)
            self.cadence.observe(time.monotonic() - started, time.monotonic())
            self.memory_cadence.reset(time.monotonic())  # memory holds this step too
            self._recorded_step = step
        throttled = now - self._last_progress < PROGRESS_INTERVAL_SECONDS
        if (not writers or memory_only) and rank == 0 and not throttled:
            self._last_progress = now
            self._recorded_step = step
            self.writer.submit(
                "progress",
                detached=True,
                metrics=dict(metrics),
                step=step,
                time=now,
                memory=self._memory_entry(now),
            )

        if notice:
            # Exit once the group committed this step's checkpoint, or once the training code
            # was offered one (should_checkpoint() said True) and declined. Until then keep
            # training: the next checkpointing report, inside the grace period, saves the work.
            self._notice = True
            if writers or self._notice_offered:
                self.flush()
                # Rank 0 records the step the group stopped at, and that nothing of this
                # attempt is left to record: the restart need not wait for the pods to go.
                self._record_last_metrics(honoured=True)
                if self.warm and not self._own_notice:
                    # Another replica was reclaimed; this one stays, with the final state in
                    # memory, and re-forms the group with a replacement.
                    log.warning(
                        "rank %d: a member's preemption notice honoured at step %d; regrouping",
                        rank,
                        step,
                    )
                    raise regroup.Regroup(f"another member was preempted at step {step}")
                log.warning("rank %d: preemption notice honoured at step %d; exiting", rank, step)
                pod.announce_preempted_exit(self.context.local_rank)
                raise SystemExit(pod.EXIT_PREEMPTED)
        elif resize and (writers or self._resize_offered):
            # The group is resized (an elastic group grows back): every member stops at this
            # checkpoint, which each holds in memory, and re-forms with the newcomers, who
            # get it from there. The upload in flight goes on in the old writer or is
            # dropped; memory has the step.
            log.warning("rank %d: the group is resized; re-forming it at step %d", rank, step)
            raise regroup.Regroup(f"the group is resized at step {step}")

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
                job = self._snapshot(seq, kind, skeleton, mine)
            else:
                parts = partition([nbytes(t) for t in tensors], writers)
                structure = skeleton if rank == writers[0] else None
                if self.warm and self.writer.background:
                    # The whole state into memory (a peer may need it), this rank's share to
                    # the bucket.
                    job = self._snapshot(
                        seq, kind, structure, dict(enumerate(tensors)), write=parts[rank]
                    )
                    self._keep_in_memory(seq, step, skeleton, metrics)
                else:
                    mine = {i: tensors[i] for i in parts[rank]}
                    job = self._snapshot(seq, kind, structure, mine)
            if not self.writer.background:
                self._pending.append(job)
        runtime = {"stateful": {name: obj.state_dict() for name, obj in self._stateful.items()}}
        if self.memory is not None and self.memory.seq == seq:
            self.memory.runtime = runtime
        if rank == 0:
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

    def _snapshot(
        self,
        seq: int,
        kind: CheckpointKind,
        skeleton: Any,
        tensors: Mapping[int, torch.Tensor],
        write: Sequence[int] | None = None,
    ) -> int:
        """The writer's save; in a warm group that lost a member, not waiting for the last one.

        A save first waits for this rank's previous upload (the snapshot buffer is reused):
        with a large state that is seconds, and a survivor waiting there learns of the loss
        only after it. Once the launcher has published a newer group (a member is gone), the
        wait ends in a Regroup: that upload belongs to a group whose checkpoints will not be
        committed, and the buffer still holds the previous snapshot. Not after an agreed
        notice (that group stops at a step it saves on purpose), nor in an elastic group,
        which re-forms at an agreed step when it grows.
        """
        probe = self._resize
        lost = None if probe is None or self.elastic or self._agreed_notice else probe.published
        try:
            return self.writer.save(seq, kind, skeleton, tensors, write=write, give_up=lost)
        except SaveAbandoned as err:
            rank = self.context.world_rank
            log.warning(
                "rank %d: a newer group was published while this rank waited for its last save",
                rank,
            )
            raise regroup.Regroup("a newer group was published during a save") from err

    def _keep_in_memory(
        self,
        seq: int,
        step: int,
        skeleton: Any,
        metrics: dict[str, Any],
        *,
        in_bucket: bool = True,
    ) -> None:
        """The snapshot the writer just took is this rank's newest whole state in memory."""
        taken = self.writer.snapshot
        if taken is None:
            return
        slots, size, buffer = taken
        self.memory = regroup.MemorySnapshot(
            seq=seq,
            step=step,
            skeleton=skeleton,
            slots=[regroup.Slot(s.index, s.offset, s.dtype, s.shape, s.count) for s in slots],
            buffer=buffer,
            size=size,
            metrics=dict(metrics),
            in_bucket=in_bucket,
        )

    def _keep_only_in_memory(
        self, step: int, metrics: dict[str, Any], checkpoint: Checkpoint
    ) -> None:
        """The memory tier: the whole state into this process's memory; no upload, no commit.

        It goes into the writer's buffer that no upload reads, so a checkpoint's upload in
        flight goes on. Labelled with the newest checkpoint number begun before it.
        """
        skeleton, tensors = flatten(checkpoint.to_dict())
        self.memory = None  # its buffer may be the one overwritten
        self.writer.keep(dict(enumerate(tensors)))
        self._keep_in_memory(self._next_seq - 1, step, skeleton, metrics, in_bucket=False)
        if self.memory is not None:
            self.memory.runtime = {
                "stateful": {name: obj.state_dict() for name, obj in self._stateful.items()}
            }

    def _memory_entry(self, now: float) -> dict[str, Any] | None:
        """status.inMemory for a progress report: rank 0's newest snapshot, if it changed."""
        memory = self.memory
        if memory is None or self._recorded_memory == (memory.step, memory.in_bucket):
            return None
        self._recorded_memory = (memory.step, memory.in_bucket)
        return in_memory(
            memory.step, bucket=memory.in_bucket, attempt=self.contract.attempt, time=now
        )

    def detach_for_regroup(self) -> MemorySnapshot | None:
        """Ends this session for a warm recovery; returns the state it holds in memory.

        An idle writer process is handed on to the next session (`WriterClient.recycle`);
        one with a job in flight is stopped at once (an upload of the lost group would never
        commit, and its commit may wait for a member that is gone). The snapshot's buffer
        stays with this process.
        """
        self._stop_watching()
        memory = self.memory
        taken = self.writer.snapshot
        if memory is not None and self.writer.holds(memory.buffer):
            if taken is not None and taken[2] is memory.buffer:
                self.writer.detach_snapshot()
            else:  # not complete: the buffer was being overwritten
                memory = None
        self._closed = True
        if not self.writer.recycle():
            self.writer.close(timeout=0)
        return memory

    @property
    def reached(self) -> int | None:
        """The newest step this process reported, in this session or the groups before it."""
        last = self._last_report[1] if self._last_report is not None else None
        known = [step for step in (self._reached, last) if step is not None]
        return max(known) if known else None

    def flush(self, timeout: float | None = None) -> None:
        """Waits until every save this rank started is written (and on rank 0, committed)."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        self.writer.drain_save(left())
        pending, self._pending = self._pending, []
        for job in pending:
            self.writer.wait(job, left())

    def _record_last_metrics(self, timeout: float | None = None, *, honoured: bool = False) -> None:
        """Rank 0: the status's lastMetrics becomes the last report, if progress was throttled.

        `honoured`: the group stopped for a preemption notice after its final checkpoint
        was recorded (flushed): status.noticeHonoured says so, whatever was recorded before.
        """
        if self.context.world_rank != 0 or self._last_report is None:
            return
        metrics, step, now = self._last_report
        if self._recorded_step == step and not honoured:
            return
        self._recorded_step = step
        job = self.writer.submit(
            "progress",
            metrics=metrics,
            step=step,
            time=now,
            memory=self._memory_entry(now),
            honoured=honoured,
        )
        try:
            self.writer.wait(job, timeout)
        except Exception as err:  # a status write is not worth failing the exit for
            log.warning("rank 0: could not record the last metrics: %s", err)

    def finish(self) -> None:
        """The training function returned: flush and stop the writer.

        Completion is recorded by the launcher of node 0 once all its workers exited 0, so a
        script and a function finish the same way. In a warm recovery the ranks first agree
        that they all finished: a member lost after the last report makes this raise
        Regroup, and the training runs again (from memory, at its end) with a replacement,
        instead of leaving the replacement waiting for a rank that is gone.
        """
        if self.warm:
            self._all_reduce([1.0])
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_watching()
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
# The state a survivor carries into the session of its next group (warm recovery).
_carried: MemorySnapshot | None = None
_reached: int | None = None


def regroup_session(group: GroupFile) -> None:
    """Ends this process's session and prepares the next one, of `group`, for get_session().

    The current session's in-memory snapshot is carried over; the process group is left and
    the environment of the next one set. The next get_session() joins it.
    """
    global _session, _carried, _reached
    with _lock:
        if _session is not None:
            _carried = _session.detach_for_regroup() or _carried
            _reached = _session.reached
            atexit.unregister(_session.close)
            _session = None
        regroup.rejoin(group)


def get_session() -> Session:
    global _session, _carried, _reached
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
                carried=_carried,
                reached=_reached,
            )
            _carried = None
            _reached = None
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
