"""The restart policy: from spec, status and one observation to actions and a new status.

`plan` is pure and level-based: it reads what is, not what happened, so a lost event, a
restarted operator or a repeated pass cannot restart a group twice. It applies one
transition at a time until the status stops changing, so its output is a fixed point:
planning again with the same observation and the returned status changes nothing and
asks for nothing new.

The states (status.state) and what moves them:

    Pending     --all replicas of the attempt running-->            Running
    Pending, Running, Restarting --preemption, failure or hang-->   Restarting (backoff)
    Restarting (backoff) --backoff over, budgets left-->            Restarting (attempt + 1)
    Restarting (backoff) --a budget spent-->                        Failed
    Restarting (attempt + 1) --all new replicas running-->          Running
    any but Succeeded, Failed --spec.suspend-->                     Suspended
    Suspended --spec.suspend cleared-->                             Pending (attempt + 1)
    any but Succeeded, Failed --training function returned-->       Succeeded

The next attempt is above every attempt a replica carries, not only the status's: after a
rolled-back status, pods of a newer attempt are fenced out instead of joined.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from spotrun.lifecycle import conditions as cond
from spotrun.lifecycle import ledger as ledger_
from spotrun.lifecycle import peers
from spotrun.lifecycle.actions import (
    Action,
    DeleteJob,
    Fail,
    RestartGroup,
    StartGroup,
    Succeed,
    Suspend,
    Wait,
)
from spotrun.lifecycle.backoff import consecutive, delay
from spotrun.lifecycle.budget import Exhausted, exhausted
from spotrun.lifecycle.classify import (
    EXIT_PREEMPTED,
    VANISHED,
    Interruption,
    blocker,
    classify,
    preemption_of,
)
from spotrun.lifecycle.group import GroupRecord
from spotrun.lifecycle.hang import ProgressWatch, progress_watch
from spotrun.lifecycle.observation import UNSCHEDULABLE, Observation, ReplicaObservation
from spotrun.lifecycle.spec import JobSpec
from spotrun.lifecycle.times import RESOLUTION_SECONDS, format_time, parse_time

PENDING: Final = "Pending"
RUNNING: Final = "Running"
RESTARTING: Final = "Restarting"
SUSPENDED: Final = "Suspended"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
FINISHED = (SUCCEEDED, FAILED)

# Why an elastic group was resized (the reasons of its `resize` ledger entries).
CAPACITY_UNAVAILABLE: Final = "CapacityUnavailable"
CAPACITY_RETURNED: Final = "CapacityReturned"
# A member sat beyond the pool after spec.spares was lowered: a waiting spare took its place.
SPARES_LOWERED: Final = "SparesLowered"
# A spare came up while a restart waited for a lost member's replacement: it took the place.
SPARE_PROMOTED: Final = "SparePromoted"
# The most spares the CRD allows: members beyond replicas + this are not ours to follow.
MAX_SPARES: Final = 100

# The status fields this policy writes. Every other field (latestCheckpoint, checkpoints,
# bestCheckpoints, lastMetrics, completion) belongs to the runtime and is only read here;
# a writer should patch only these, so it cannot undo a checkpoint recorded meanwhile.
OWNED_FIELDS = (
    "state",
    "attempt",
    "preemptions",
    "failures",
    "readyReplicas",
    "conditions",
    "interruptions",
    "startTime",
    "completionTime",
    "observedGeneration",
    "restartNotBefore",
    "attemptStartTime",
    "group",
    "size",
    "spares",
)

# Each transition moves a job strictly along the state diagram, so a handful of steps
# always reaches the fixed point; more means a bug in the policy, not a slow job.
_MAX_STEPS = 10


@dataclass(frozen=True)
class Plan:
    """What to do now (`actions`, in order) and the status to write (`status`).

    `status` is the whole status: the fields the policy owns (OWNED_FIELDS) updated,
    every other field (the runtime's checkpoints and metrics) copied unchanged. No
    actions means nothing to do until the observation changes.
    """

    actions: tuple[Action, ...]
    status: dict[str, Any]


def plan(
    spec: JobSpec,
    status: Mapping[str, Any],
    observation: Observation,
    jitter: random.Random | float = 0.5,
) -> Plan:
    """Decides the next actions and status of a TrainJob.

    `status` is the TrainJob's status as read (camelCase, as in the CRD; empty for a new
    job). `jitter` is the random draw for the backoff (a float in [0, 1) or a Random to
    draw it from), passed in so that tests can pin it; it is used only when an
    interruption is first seen, and its result is kept in status.restartNotBefore.
    """
    # Members their peers report silent are lost, whatever their pods say.
    step = _Step(spec, peers.mark(status, observation, spec.replicas), jitter)
    current = copy.deepcopy(dict(status))
    for _ in range(_MAX_STEPS):
        following, actions = step(current)
        if following == current:
            return Plan(tuple(actions), following)
        current = following
    raise RuntimeError(f"the lifecycle policy did not settle within {_MAX_STEPS} transitions")


def pool_size(spec: JobSpec, status: Mapping[str, Any]) -> int:
    """How many pods the job's StatefulSet runs: spec.replicas + spec.spares, or more.

    More while a member of the current group sits at an ordinal beyond that pool (spec.spares
    was lowered since a spare was promoted there): a StatefulSet removes its highest ordinals
    first, and that member goes only once a waiting spare took its place (SparesLowered).
    """
    record = GroupRecord.from_status(status)
    members = () if record is None or record.attempt != status.get("attempt") else record.members
    ours = [i for i in members if 0 <= i < spec.replicas + MAX_SPARES]
    return max([spec.pool, *(i + 1 for i in ours)])


def resume_point(spec: JobSpec, status: Mapping[str, Any]) -> str | None:
    """Where a new attempt resumes: the latest committed checkpoint, else spec.resumeFrom."""
    latest = status.get("latestCheckpoint") or {}
    return latest.get("uri") or spec.resume_from


class _Step:
    """One transition of the state diagram, for a fixed spec and observation."""

    def __init__(
        self, spec: JobSpec, observation: Observation, jitter: random.Random | float
    ) -> None:
        self.spec = spec
        self.obs = observation
        self.now = observation.now
        self.jitter = jitter
        self._draw: float | None = None
        self._record: GroupRecord | None = None

    def draw(self) -> float:
        """The jitter draw, taken from a Random only when a backoff is computed, at most once."""
        if self._draw is None:
            jitter = self.jitter
            self._draw = jitter.random() if isinstance(jitter, random.Random) else float(jitter)
        return self._draw

    def __call__(self, status: dict[str, Any]) -> tuple[dict[str, Any], list[Action]]:
        st = copy.deepcopy(status)
        if self.obs.generation is not None:
            st["observedGeneration"] = self.obs.generation
        st["state"] = st.get("state") or PENDING
        st.setdefault("attempt", 0)
        st.setdefault("preemptions", 0)
        st.setdefault("failures", 0)
        self._record = GroupRecord.from_status(st)
        actions = self._transition(st)
        self._record = GroupRecord.from_status(st)
        self._report_replicas(st)
        return st, actions

    def _transition(self, st: dict[str, Any]) -> list[Action]:
        state, attempt = st["state"], int(st["attempt"])
        if state in FINISHED:
            return self._finished(st)
        if self.obs.completed or (attempt and self._all_succeeded(attempt)):
            return self._succeed(st)
        if self.obs.suspended:
            return self._suspend(st)
        if state == SUSPENDED or attempt == 0:
            return self._start(st)
        if state == RESTARTING and "restartNotBefore" in st:
            return self._backoff(st)
        return self._supervise(st)

    # -- transitions ----------------------------------------------------------------

    def _start(self, st: dict[str, Any]) -> list[Action]:
        """A first start, or a resume after suspend: a new attempt, no budget spent."""
        verdict = self._exhausted(st)
        if verdict is not None:
            # Budgets are checked whenever a new attempt would start: a failure seen just
            # before a suspend must not be forgotten by the resume.
            return self._fail(st, verdict)
        attempt = self._next_attempt(st)
        if st["state"] == SUSPENDED:
            self._condition(
                st,
                cond.SUSPENDED,
                False,
                "Resumed",
                f"spec.suspend was cleared; attempt {attempt} starts",
            )
        st.update(state=PENDING, attempt=attempt)
        st["group"] = GroupRecord(attempt, "cold", self.spec.replicas).to_status()
        st.setdefault("startTime", format_time(self.now))
        st.pop("restartNotBefore", None)
        st.pop("attemptStartTime", None)
        return [StartGroup(attempt, resume_point(self.spec, st))]

    def _supervise(self, st: dict[str, Any]) -> list[Action]:
        """Pending, Running or Restarting after the restart went out: watch the attempt."""
        state, attempt = st["state"], int(st["attempt"])
        current = self._group(attempt)
        members = self._members(attempt)
        interruption = classify(
            current,
            expected=members,
            was_running=state == RUNNING,
            now=self.now,
            watch=self._watch(st) if state == RUNNING else None,
        )
        if interruption is not None:
            return self._interrupt(st, attempt, interruption)

        up = {r.index for r in current if r.phase in ("running", "succeeded")}
        replicas = len(members)
        if len(up) >= replicas:
            resize = (
                (self._grow(st, attempt) or self._compact(st, attempt))
                if state == RUNNING
                else None
            )
            return resize if resize is not None else self._running(st, attempt)
        incomplete = (
            bool(self.obs.stale(attempt)) or sum(1 for r in current if r.present) < replicas
        )
        progress = f"{len(up)}/{replicas} replicas of attempt {attempt} running"
        if state == RESTARTING:
            self._refine_vanished(st, attempt)
            entry = _last_open(st.get("interruptions") or [])
            reason = str(entry.get("reason")) if entry else "Restarting"
            self._condition(st, cond.RUNNING, False, reason, f"restarting: {progress}")
            not_before = (
                parse_time(str(entry["restartTime"]))
                if entry and "restartTime" in entry
                else self.now
            )
            resume = resume_point(self.spec, st)
            record = GroupRecord.from_status(st)
            keep = record.kept if record is not None and record.attempt == attempt else ()
            restart: list[Action] = (
                [RestartGroup(attempt, resume, reason, not_before, keep)] if incomplete else []
            )
            late = self._promote_late(st, attempt, current) or self._start_around(
                st, attempt, current
            )
            if late is not None:
                return late
            return self._shrink(st, attempt, current, restart) or restart
        st["state"] = PENDING
        around = self._start_around(st, attempt, current)
        if around is not None:
            return around
        self._condition(st, cond.RUNNING, False, "Starting", f"starting: {progress}")
        return [StartGroup(attempt, resume_point(self.spec, st))] if incomplete else []

    def _refine_vanished(self, st: dict[str, Any], attempt: int) -> None:
        """A replica lost as `Vanished` takes the reason its replacement carries, if one comes.

        A preemption restarts at once, so the pod that replaced the lost one (carrying what
        the lost one said: a DisruptionTarget, a node shutdown) is often seen only after
        the restart went out; until the new attempt runs, the ledger can still learn it.
        """
        entries = st.get("interruptions") or []
        index = _last_open_index(entries)
        if index is None or entries[index].get("reason") != VANISHED:
            return
        late = preemption_of(self._group(int(entries[index].get("attempt", attempt - 1))))
        if late is not None and late.reason != VANISHED:
            st["interruptions"] = ledger_.reclassify(entries, index, late)

    def _running(self, st: dict[str, Any], attempt: int) -> list[Action]:
        self._fill_steps_lost(st, attempt)
        if st["state"] != RUNNING:
            if st["state"] == RESTARTING:
                entries = st.get("interruptions") or []
                for index in ledger_.open_tail(entries):
                    entries = ledger_.mark_recovered(entries, index, now=self.now)
                st["interruptions"] = entries
            st["state"] = RUNNING
            st["attemptStartTime"] = format_time(self.now)
        self._condition(
            st,
            cond.RUNNING,
            True,
            "AllReplicasRunning",
            f"attempt {attempt}: {self._size(attempt)}/{self.spec.replicas} replicas running",
        )
        watch = self._watch(st)
        if watch is None:
            return []
        return [Wait(watch.until, "StartupDeadline" if watch.starting else "ProgressDeadline")]

    def _interrupt(
        self, st: dict[str, Any], attempt: int, interruption: Interruption
    ) -> list[Action]:
        """Counts the interruption once, records it, and starts the backoff."""
        if interruption.kind == "preemption":
            st["preemptions"] = int(st["preemptions"]) + 1
        else:
            st["failures"] = int(st["failures"]) + 1
        entries = ledger_.record(
            st.get("interruptions") or [],
            interruption,
            attempt=attempt,
            now=self.now,
            step=_progress_step(st),
        )
        # A preemption is the capacity going, not a crash loop: no backoff (the restart still
        # waits for a final checkpoint being written, and a replacement for the scheduler).
        wait = (
            0.0
            if interruption.kind == "preemption"
            else delay(self.spec.failure_policy.backoff, consecutive(entries), self.draw())
        )
        st.update(
            state=RESTARTING, interruptions=entries, restartNotBefore=format_time(self.now + wait)
        )
        st.pop("attemptStartTime", None)
        return [Wait(parse_time(st["restartNotBefore"]), "Backoff")]

    def _backoff(self, st: dict[str, Any]) -> list[Action]:
        """Restarting, before the restart: wait out backoff and drain, then restart or fail."""
        attempt = int(st["attempt"])
        entries = st.get("interruptions") or []
        index = ledger_.open_entry(entries, attempt)
        if index is None:
            # The ledger no longer holds this interruption (edited by hand): restart anyway.
            entries = ledger_.record(
                entries,
                Interruption("failure", "Unknown", "interruption not in the ledger", ()),
                attempt=attempt,
                now=self.now,
                step=None,
            )
            index = len(entries) - 1
        replicas = self._group(attempt)
        if entries[index]["kind"] != "preemption":
            # Evidence of a lost node often comes after the other ranks crashed of it: until
            # the restart goes out, a failure can still turn out to be a preemption.
            late = preemption_of(replicas)
            if late is not None:
                st["failures"] = int(st["failures"]) - 1
                st["preemptions"] = int(st["preemptions"]) + 1
                entries = ledger_.reclassify(entries, index, late)
        elif entries[index]["reason"] == VANISHED:
            # A replica seen missing is the least that is known; the pod that replaced it
            # may carry what the lost one said (a DisruptionTarget, a node shutdown).
            late = preemption_of(replicas)
            if late is not None and late.reason != VANISHED:
                entries = ledger_.reclassify(entries, index, late)
        st["interruptions"] = entries
        entry = entries[index]
        reason, message = str(entry["reason"]), str(entry.get("message", ""))

        until, why = parse_time(str(st["restartNotBefore"])), "Backoff"
        if entry["kind"] == "preemption" and _committing_final_checkpoint(
            replicas, warm=self.spec.recovery == "warm", honoured=_honoured(st, attempt)
        ):
            # The group is writing its final checkpoint within the grace period; rank 0
            # records it last, so restarting now would fence that checkpoint out.
            drained_by = parse_time(str(entry["time"])) + self.spec.grace_seconds
            if drained_by > until:
                until, why = drained_by, "CommittingFinalCheckpoint"
        verdict = self._exhausted(st)
        # A restart due within the status's resolution is due now: a preemption's
        # restartNotBefore is the pass's own time, rounded, and half the time it read back
        # a fraction of a millisecond late, which cost the restart a pass of its own.
        if self.now < until - RESOLUTION_SECONDS:
            then = (
                f"failing ({verdict.reason})"
                if verdict
                else f"restarting as attempt {self._next_attempt(st)}"
            )
            self._condition(
                st, cond.RUNNING, False, reason, f"{message}; {then} at {format_time(until)}"
            )
            return [Wait(until, why)]
        if verdict is not None:
            return self._fail(st, verdict)

        latest = st.get("latestCheckpoint") or {}
        resume_step = latest.get("step", None if self.spec.resume_from else 0)
        following = self._next_attempt(st)
        # Survivors are relabelled from `attempt` to the next one; a skipped number (pods of
        # a newer attempt exist, the status was rolled back) restarts cold.
        warm = entry["kind"] == "preemption" and following == attempt + 1
        keep = self._survivors(replicas, attempt) if warm else ()
        silent = tuple(r.index for r in replicas if r.unresponsive and r.index not in keep)
        st["interruptions"] = ledger_.mark_restarted(
            entries,
            index,
            now=self.now,
            step=_progress_step(st),
            # A warm recovery resumes from the survivors' memory: what it loses is known
            # only once the group trains again.
            resume_step=None if keep or resume_step is None else int(resume_step),
            recovery="warm" if keep else "cold",
            unresponsive=silent,
        )
        st["attempt"] = following
        # A warm recovery re-forms the same members (a waiting spare, else a replacement,
        # takes the lost one's place); a cold restart brings every replica back, at the
        # target size.
        members = self._members(attempt) if keep else ()
        if keep and self.spec.spares:
            members, keep = self._promote(attempt, members, keep)
        whole = members == tuple(range(self.spec.replicas))
        members = () if whole else members
        st["group"] = GroupRecord(
            following,
            "warm" if keep else "cold",
            len(members) or self.spec.replicas,
            keep,
            members=members,
            # What the members' checkpoint cadences assume of the next interruption.
            mtbf_seconds=ledger_.observed_mtbf(st, self.now),
        ).to_status()
        st.pop("restartNotBefore")
        return [RestartGroup(following, resume_point(self.spec, st), reason, self.now, keep)]

    def _promote(
        self, attempt: int, members: tuple[int, ...], survivors: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Warm spares: each lost member's place goes to a spare pod that waits, if one does.

        Returns the next group's members (a promoted spare in the lost one's place, so the
        survivors keep their node ranks) and the replicas kept in place: the survivors and
        every waiting spare (the promoted ones, and those that go on waiting). The lost
        members' pods are replaced from the new template and wait as the next spares.
        """
        spares = self._waiting(attempt, members)
        leaving = [i for i in members if i not in survivors]
        return _put_in(members, leaving, spares), tuple(sorted({*survivors, *spares}))

    def _promote_late(
        self, st: dict[str, Any], attempt: int, current: Sequence[ReplicaObservation]
    ) -> list[Action] | None:
        """spec.spares: a spare that runs while the restart waits takes a replacement's place.

        The restart went out without a waiting spare for every lost member (all lost, or
        still starting), so it waits for their replacements; a spare that runs first has
        its imports done, and the replacement may not be schedulable at all. A new warm
        attempt puts the spare in that member's node rank (SparePromoted, no budget spent),
        and the replacement, once it runs, waits as the next spare. Only replacements are
        given up this way, never a kept member (its pod may still carry the old attempt).
        """
        record = self._record
        if not self.spec.spares or record is None or record.attempt != attempt:
            return None
        if record.mode != "warm":
            return None  # a cold restart brings every pod back anyway, spares included
        members = self._members(attempt)
        seen = {r.index: r for r in current}
        missing = [i for i in members if i not in record.kept and not _runs(seen.get(i))]
        waiting = self._waiting(attempt, members)
        if not missing or not waiting or self._next_attempt(st) != attempt + 1:
            return None
        after = _put_in(members, missing, waiting)
        moved = [(old, new) for old, new in zip(members, after, strict=True) if old != new]
        message = "; ".join(
            f"spare {new} takes replica {old}'s place: its replacement is not running"
            for old, new in moved
        )
        return self._resize(st, attempt, members, after, SPARE_PROMOTED, message)

    def _start_around(
        self, st: dict[str, Any], attempt: int, current: Sequence[ReplicaObservation]
    ) -> list[Action] | None:
        """spec.spares: a group that starts around a member the scheduler cannot place.

        At a start (the job's first attempt, or a cold restart) the scheduler may place a
        spare's pod and not a member's: 2 replicas and a spare on 2 free GPUs, pods 0 and 2
        placed, pod 1 Unschedulable. The group would wait for pod 1 with pod 2 idle; instead
        the running spare takes that member's node rank in a new warm attempt
        (SparePromoted, no budget spent), and pod 1 waits as the spare. A member that is
        being created, pulled or started is waited for: only Unschedulable ones are given up.
        """
        record = self._record
        if not self.spec.spares or self.spec.recovery != "warm":
            return None
        if record is not None and record.attempt == attempt and record.mode == "warm":
            return None  # a warm group waits for replacements: _promote_late's
        members = self._members(attempt)
        seen = {r.index: r for r in current}
        stuck = [
            i for i in members if (r := seen.get(i)) is not None and r.present and _unplaceable(r)
        ]
        waiting = self._waiting(attempt, members)
        if not stuck or not waiting or self._next_attempt(st) != attempt + 1:
            return None
        after = _put_in(members, stuck, waiting)
        moved = [(old, new) for old, new in zip(members, after, strict=True) if old != new]
        message = "; ".join(
            f"spare {new} takes replica {old}'s place: it cannot be scheduled" for old, new in moved
        )
        return self._resize(st, attempt, members, after, SPARE_PROMOTED, message)

    def _shrink(
        self,
        st: dict[str, Any],
        attempt: int,
        current: Sequence[ReplicaObservation],
        restart: list[Action],
    ) -> list[Action] | None:
        """Elastic: the group goes on without replacements that cannot be scheduled.

        While a warm restart waits for a replacement that the scheduler cannot place
        (Unschedulable, or no pod at all), the group waits spec.elastic.waitSeconds from
        the restart; then the survivors re-form alone as a new attempt, if they are at
        least minReplicas. None when this does not apply (and the restart goes on).
        """
        elastic = self.spec.elastic
        entry = _last_open(st.get("interruptions") or [])
        if elastic is None or entry is None or self.spec.recovery != "warm":
            return None
        members = self._members(attempt)
        seen = {r.index: r for r in current}
        alive = tuple(i for i in members if _runs(seen.get(i)))
        missing = [i for i in members if i not in alive]
        if not missing or len(alive) < elastic.min_replicas:
            return None
        if not all(_unplaceable(seen.get(i)) for i in missing):
            return None  # scheduled and starting (pulling, creating): not a lack of capacity
        since = parse_time(str(entry.get("restartTime") or entry["time"]))
        deadline = since + elastic.wait_seconds
        lost = ", ".join(str(i) for i in missing)
        if self.now < deadline:
            self._condition(
                st,
                cond.RUNNING,
                False,
                "WaitingForCapacity",
                f"replica {lost} cannot be scheduled; the group goes on with {len(alive)} of "
                f"{self.spec.replicas} replicas at {format_time(deadline)} "
                "(spec.elastic.waitSeconds)",
            )
            return [*restart, Wait(deadline, "ElasticWait")]
        following = self._next_attempt(st)
        if following != attempt + 1:
            return None  # pods of a newer attempt exist: the restart sorts that out first
        # (A spare that came up since took a missing member's place first: _promote_late.)
        message = (
            f"replica {lost} could not be scheduled for {elastic.wait_seconds:g}s: the group "
            f"goes on with {len(alive)} of {self.spec.replicas} replicas"
        )
        return self._resize(st, attempt, members, alive, CAPACITY_UNAVAILABLE, message)

    def _grow(self, st: dict[str, Any], attempt: int) -> list[Action] | None:
        """Elastic, below its target: replicas that run again outside the group join it.

        A new, warm attempt keeps every member and the joiners; the members stop at their
        next checkpoint (the runtime's side), so the joiners get that state from memory.
        """
        elastic = self.spec.elastic
        members = self._members(attempt)
        if elastic is None or len(members) >= self.spec.replicas:
            return None
        # With spec.spares more may wait than the group lacks: the lowest ordinals join, the
        # others go on waiting as spares.
        joiners = self._joiners(attempt)[: self.spec.replicas - len(members)]
        following = self._next_attempt(st)
        if not joiners or following != attempt + 1:
            return None
        grown = tuple(sorted({*members, *joiners}))
        message = (
            f"replica {', '.join(str(i) for i in joiners)} runs again: the group grows from "
            f"{len(members)} to {len(grown)} of {self.spec.replicas} replicas at its next "
            "checkpoint"
        )
        return self._resize(st, attempt, members, grown, CAPACITY_RETURNED, message)

    def _compact(self, st: dict[str, Any], attempt: int) -> list[Action] | None:
        """spec.spares lowered: members beyond the new pool hand their places to spares.

        A member at an ordinal of spec.replicas + spec.spares or more keeps its StatefulSet
        from shrinking (pool_size). Once a spare waits inside the pool, a new warm attempt
        puts it in that member's node rank (the members stop at their next checkpoint, and
        the spare gets that state from memory, as a group that grows does); the member
        beyond is no longer kept, and the StatefulSet then removes its pod.
        """
        members = self._members(attempt)
        beyond = [i for i in members if i >= self.spec.pool]
        if not beyond or self._next_attempt(st) != attempt + 1:
            return None
        swapped = _put_in(members, beyond, self._waiting(attempt, members))
        moved = [(old, new) for old, new in zip(members, swapped, strict=True) if old != new]
        if not moved:
            return None
        message = "spec.spares is {}: {} inside the pool take{} the place of {}".format(
            self.spec.spares,
            ", ".join(f"spare {new}" for _, new in moved),
            "s" if len(moved) == 1 else "",
            ", ".join(f"member {old}" for old, _ in moved),
        )
        return self._resize(st, attempt, members, swapped, SPARES_LOWERED, message)

    def _resize(
        self,
        st: dict[str, Any],
        attempt: int,
        before: tuple[int, ...],
        after: tuple[int, ...],
        reason: str,
        message: str,
    ) -> list[Action]:
        """Re-forms `attempt`'s group of `before` as the next attempt of `after`, warm.

        Every member of `after` is kept in place (survivors, or replicas waiting outside
        the group), and so is every spare that goes on waiting; the ledger records the
        resize, which spends no budget.
        """
        st["interruptions"] = ledger_.record_resize(
            st.get("interruptions") or [],
            attempt=attempt,
            now=self.now,
            reason=reason,
            message=message,
            replicas=(len(before), len(after)),
            step=_progress_step(st),
        )
        following = attempt + 1
        # Members 0 to replicas - 1 in order are written as none (GroupRecord.indices).
        members = () if after == tuple(range(self.spec.replicas)) else after
        keep = tuple(sorted({*after, *self._waiting(attempt, after)}))
        st.update(state=RESTARTING, attempt=following)
        st.pop("attemptStartTime", None)
        st["group"] = GroupRecord(
            following,
            "warm",
            len(after),
            keep,
            members=members,
            mtbf_seconds=ledger_.observed_mtbf(st, self.now),
        ).to_status()
        self._condition(st, cond.RUNNING, False, reason, message)
        return [RestartGroup(following, resume_point(self.spec, st), reason, self.now, keep)]

    def _next_attempt(self, st: Mapping[str, Any]) -> int:
        """The fencing token of the next attempt: above the status's and every replica's.

        Replicas of an attempt newer than the status's exist only if the status was rolled
        back (restored, edited); reusing their number would make them members of an attempt
        they were never started for, and count their interruptions against it.
        """
        seen = [r.attempt for r in self.obs.replicas if r.attempt is not None]
        return max([int(st["attempt"]), *seen]) + 1

    def _survivors(self, replicas: Sequence[ReplicaObservation], attempt: int) -> tuple[int, ...]:
        """The replicas a warm recovery keeps: running, not preempted, not replacements.

        Empty when the job asks for cold recovery, or when nobody survived (then every
        replica is new anyway).
        """
        if self.spec.recovery != "warm":
            return ()
        alive = {
            r.index
            for r in replicas
            if r.phase == "running" and not r.preempted and not r.replaced and r.present
        }
        return tuple(sorted(alive)) if len(alive) < self._size(attempt) else ()

    def _fill_steps_lost(self, st: dict[str, Any], attempt: int) -> None:
        """A warm recovery's steps lost, once the runtime said where the state came from.

        At the restart they are unknown (the survivors' memory may be newer than any
        checkpoint); status.restoredFrom, written by rank 0 of the new attempt, tells.
        """
        restored = st.get("restoredFrom") or {}
        entries = st.get("interruptions") or []
        if not entries or restored.get("attempt") != attempt or "step" not in restored:
            return
        last = entries[-1]
        if "stepsLost" in last or last.get("attempt") != attempt - 1:
            return
        # The progress the status knew at the loss, or what a survivor reported after it
        # (progress is written at most once a second): the newer of the two.
        reached = [int(v) for v in (last.get("step"), restored.get("reached")) if v is not None]
        if not reached:
            return
        lost = max(0, max(reached) - int(restored["step"]))
        st["interruptions"] = ledger_.update(entries, len(entries) - 1, stepsLost=lost)

    def _fail(self, st: dict[str, Any], verdict: Exhausted) -> list[Action]:
        st.update(state=FAILED, completionTime=format_time(self.now))
        st.pop("restartNotBefore", None)
        self._condition(st, cond.FAILED, True, verdict.reason, verdict.message)
        self._condition(st, cond.RUNNING, False, verdict.reason, "the job failed")
        return [Fail(verdict.reason, verdict.message)]

    def _succeed(self, st: dict[str, Any]) -> list[Action]:
        st.update(state=SUCCEEDED, completionTime=format_time(self.now))
        st.pop("restartNotBefore", None)
        self._condition(st, cond.SUCCEEDED, True, "Completed", "the training function returned")
        self._condition(st, cond.RUNNING, False, "Completed", "the training finished")
        return [Succeed()]

    def _suspend(self, st: dict[str, Any]) -> list[Action]:
        st["state"] = SUSPENDED
        st.pop("restartNotBefore", None)
        st.pop("attemptStartTime", None)
        self._condition(
            st,
            cond.SUSPENDED,
            True,
            "SuspendRequested",
            "spec.suspend is true: the group is stopped; "
            "clear it to resume from the latest checkpoint",
        )
        self._condition(st, cond.RUNNING, False, "Suspended", "the job is suspended")
        return [Suspend()]

    def _finished(self, st: dict[str, Any]) -> list[Action]:
        """Succeeded or Failed: keep the group stopped, and delete the job when its TTL ends."""
        if st["state"] == SUCCEEDED:
            actions: list[Action] = [Succeed()]
        else:
            failed = cond.find(st.get("conditions") or [], cond.FAILED) or {}
            actions = [Fail(str(failed.get("reason", "Failed")), str(failed.get("message", "")))]
        ttl = self.spec.ttl_seconds_after_finished
        if ttl is not None and "completionTime" in st:
            expires = parse_time(str(st["completionTime"])) + ttl
            actions.append(
                DeleteJob() if self.now >= expires else Wait(expires, "TTLAfterFinished")
            )
        return actions

    # -- helpers --------------------------------------------------------------------

    def _report_replicas(self, st: dict[str, Any]) -> None:
        """readyReplicas and PodsReady, from the replicas of the attempt now in status."""
        attempt = int(st["attempt"])
        replicas = self._size(attempt) if attempt else self.spec.replicas
        current = self._group(attempt) if attempt else ()
        if attempt:
            st["size"] = f"{replicas}/{self.spec.replicas}"
        if attempt and self.spec.spares and st["state"] not in (*FINISHED, SUSPENDED):
            # Waiting spares (running pods of the pool outside the group) / spec.spares.
            waiting = self._waiting(attempt, self._members(attempt))
            st["spares"] = f"{min(len(waiting), self.spec.spares)}/{self.spec.spares}"
        else:
            st.pop("spares", None)
        ready = len({r.index for r in current if r.ready and r.present})
        st["readyReplicas"] = ready
        if ready >= replicas:
            self._condition(
                st, cond.PODS_READY, True, "AllReplicasReady", f"{ready}/{replicas} replicas ready"
            )
            return
        stuck = blocker(current) if st["state"] not in (*FINISHED, SUSPENDED) else None
        if stuck is not None:
            self._condition(st, cond.PODS_READY, False, stuck.reason, stuck.message)
        elif st["state"] in (*FINISHED, SUSPENDED):
            self._condition(st, cond.PODS_READY, False, st["state"], "the group is stopped")
        else:
            self._condition(
                st,
                cond.PODS_READY,
                False,
                "ReplicasNotReady",
                f"{ready}/{replicas} replicas of attempt {attempt} ready",
            )

    def _condition(
        self, st: dict[str, Any], type_: str, status: bool, reason: str, message: str
    ) -> None:
        st["conditions"] = cond.set_condition(
            st.get("conditions") or [],
            type_,
            status,
            reason,
            message,
            now=self.now,
            generation=self.obs.generation,
        )

    def _exhausted(self, st: Mapping[str, Any]) -> Exhausted | None:
        return exhausted(
            self.spec.failure_policy,
            failures=int(st["failures"]),
            preemptions=int(st["preemptions"]),
            failure_times=ledger_.failure_times(st.get("interruptions") or []),
        )

    def _members(self, attempt: int) -> tuple[int, ...]:
        """The replica indices of `attempt`'s group: status.group's members, else all."""
        record = self._record
        if record is not None and record.attempt == attempt and record.members:
            # Beyond spec.replicas + spec.spares too: spec.spares may have been lowered since.
            return tuple(i for i in record.members if 0 <= i < self.spec.replicas + MAX_SPARES)
        return tuple(range(self.spec.replicas))

    def _size(self, attempt: int) -> int:
        return len(self._members(attempt))

    def _group(self, attempt: int) -> tuple[ReplicaObservation, ...]:
        """The replicas of `attempt` that belong to its group (status.group's members)."""
        members = set(self._members(attempt))
        return tuple(r for r in self.obs.of_attempt(attempt) if r.index in members)

    def _joiners(self, attempt: int) -> tuple[int, ...]:
        """Replicas of `attempt` outside its elastic group that run and wait to join it.

        The pods of the pool (spec.replicas + spec.spares), lowest ordinal first; not a
        replacement still in a lost pod's place.
        """
        replaced = {r.index for r in self.obs.of_attempt(attempt) if r.replaced}
        waiting = self._waiting(attempt, self._members(attempt))
        return tuple(i for i in waiting if i not in replaced)

    def _waiting(self, attempt: int, members: Sequence[int]) -> tuple[int, ...]:
        """The pods of the pool outside `members` that run and wait: spec.spares's spares.

        A spare pod recreated after its own loss counts (it waits like any other); a
        preempted one does not. With spec.spares lowered to 0 the pod that a member beyond
        the pool hands its place to is one (_compact).
        """
        return tuple(
            sorted(
                r.index
                for r in self.obs.of_attempt(attempt)
                if r.index not in members
                and 0 <= r.index < self.spec.pool
                and r.phase == "running"
                and r.present
                and not r.preempted
            )
        )

    def _watch(self, st: Mapping[str, Any]) -> ProgressWatch | None:
        """The hang watch on the running attempt: start-up allowance, then progress deadline."""
        start = st.get("attemptStartTime")
        return progress_watch(
            self.spec.failure_policy,
            attempt_start=parse_time(str(start)) if start else None,
            last_progress=self.obs.last_progress_time,
        )

    def _all_succeeded(self, attempt: int) -> bool:
        done = {r.index for r in self._group(attempt) if r.phase == "succeeded"}
        return len(done) >= self._size(attempt)


def _put_in(
    members: Sequence[int], leaving: Sequence[int], spares: Sequence[int]
) -> tuple[int, ...]:
    """`members` with each one in `leaving`, in node-rank order, replaced by the next spare.

    The others keep their node ranks; a leaving member stays where no spare is left for it.
    """
    queue = iter(spares)
    return tuple(next(queue, i) if i in leaving else i for i in members)


def _runs(replica: ReplicaObservation | None) -> bool:
    return replica is not None and replica.phase == "running" and replica.present


def _unplaceable(replica: ReplicaObservation | None) -> bool:
    """No pod, or one the scheduler cannot place: what elastic.waitSeconds gives up on."""
    if replica is None or not replica.present:
        return True
    return replica.phase == "pending" and replica.waiting_reason == UNSCHEDULABLE


def _progress_step(status: Mapping[str, Any]) -> int | None:
    step = (status.get("lastMetrics") or {}).get("step")
    return int(step) if isinstance(step, int | float) and not isinstance(step, bool) else None


def _last_open_index(entries: Sequence[Mapping[str, Any]]) -> int | None:
    if entries and "secondsToRecover" not in entries[-1]:
        return len(entries) - 1
    return None


def _last_open(entries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    index = _last_open_index(entries)
    return None if index is None else entries[index]


__all__ = ["FINISHED", "OWNED_FIELDS", "Plan", "plan", "resume_point"]


def _honoured(status: Mapping[str, Any], attempt: int) -> bool:
    """Rank 0 of `attempt` recorded that its group honoured a preemption notice."""
    mark = status.get("noticeHonoured")
    return isinstance(mark, Mapping) and mark.get("attempt") == attempt


def _committing_final_checkpoint(
    replicas: Sequence[ReplicaObservation], *, warm: bool = False, honoured: bool = False
) -> bool:
    """The group is writing the final checkpoint of a preemption notice.

    Either a preempted replica still runs (it got the notice), or part of the group already
    honoured the notice (exit 75) while the rest still run: every rank agreed on the same
    final step, and rank 0 records it last. A replica lost without notice (killed, node
    gone) leaves nothing to wait for, and neither does its replacement (a new pod in its
    place, force-deleted or not): that process never got the notice. Once rank 0 recorded
    that the group honoured the notice (status.noticeHonoured of the attempt, written after
    its final checkpoint was), nothing is left to wait for either: the reclaimed pods are
    only exiting, and the kubelet reports that a second or so later.
    """
    if honoured:
        return False
    running = [r for r in replicas if r.phase == "running" and not r.replaced]
    if any(r.preempted and not r.unresponsive for r in running):
        return True
    if warm:
        # Survivors of a warm recovery stay after the final checkpoint (they hold it in
        # memory), so once the preempted replicas are gone there is nothing to wait for.
        return False
    return bool(running) and any(r.exit_code == EXIT_PREEMPTED for r in replicas)
