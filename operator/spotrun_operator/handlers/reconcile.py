"""The reconcile loop of one TrainJob: observe, plan, write the status, act, sleep.

One loop per TrainJob (a kopf daemon) is the only code that decides about that job, so
two decisions can never race. Each pass is level-based: it reads the job, its pods, its
StatefulSet and the nodes as they are now, asks `spotrun.lifecycle.plan` what to do,
writes the status once (only if it changed, fenced by the resourceVersion it read), then
applies the actions, which are idempotent: a pass repeated after a crash, a lost event
or a conflict converges to the same state instead of restarting the group twice.

The order matters for the fence: the status (with the new attempt) is written BEFORE the
StatefulSet gets the new template, so no pod of attempt N+1 runs while status.attempt
still says N; its checkpoints would be refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spotrun.lifecycle import (
    DeleteJob,
    Fail,
    JobSpec,
    RestartGroup,
    StartGroup,
    Succeed,
    Suspend,
    Wait,
    format_time,
    ledger,
    parse_time,
    plan,
    pool_size,
)
from spotrun.lifecycle.group import GroupRecord
from spotrun_operator import children, metrics, names, observe, transitions
from spotrun_operator.apply import Conflict, Gone
from spotrun_operator.config import Shared
from spotrun_operator.observe import GONE_REASONS, NodeFacts, SeenPods
from spotrun_operator.wakeups import JobKey

log = logging.getLogger(__name__)

NO_STORAGE = transitions.Event(
    "Warning",
    "NoCheckpointStorage",
    "spec.checkpoint.storage is not set and the operator has no default "
    f"({children.DEFAULT_STORAGE_ENV}): checkpoints cannot survive a restart of the group; "
    "set spec.checkpoint.storage (e.g. gs://bucket/prefix) in a new TrainJob",
)


@dataclass
class JobMemory:
    """What one job's loop remembers between passes (lost on restart, by design harmless)."""

    seen: SeenPods = field(default_factory=SeenPods)
    children_ensured: bool = False
    # The job as returned by our last status write: fresher than kopf's copy until the
    # watch event of that write arrives.
    written: dict[str, Any] | None = None
    state: str | None = None
    # The StatefulSet spec (hash, replicas) last sent, and when: until the watch shows it,
    # passes woken by other events must not send it again.
    statefulset_sent: tuple[str, int, float] | None = None
    # Pods this loop asked to delete, by UID (with whether it forced it): not asked twice.
    deleted: set[tuple[str, bool]] = field(default_factory=set)
    # Silent members' pods seen going, by UID: since when (time.monotonic()).
    silent_going: dict[str, float] = field(default_factory=dict)
    # The runtime's ledger conditions already announced (None: not looked at yet).
    runtime_conditions: dict[str, tuple[str, str]] | None = None


def _rv(body: Mapping[str, Any] | None) -> int:
    try:
        return int((body or {}).get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:  # opaque on some servers: trust the watch
        return 0


def freshest(live: Mapping[str, Any], written: Mapping[str, Any] | None) -> dict[str, Any]:
    """The newer of kopf's live copy of the job and the copy our last write returned."""
    if written is not None and _rv(written) > _rv(live):
        return dict(written)
    return {k: v for k, v in live.items()}


async def run(
    *,
    shared: Shared,
    namespace: str,
    name: str,
    body: Mapping[str, Any],
    pods: Mapping[JobKey, Iterable[Mapping[str, Any]]],
    statefulsets: Mapping[JobKey, Iterable[Mapping[str, Any]]],
    nodes: Mapping[str, Iterable[NodeFacts]],
    stopped: Any,
) -> None:
    """Runs passes until kopf stops the daemon (job deleted, operator exiting)."""
    key = (namespace, name)
    memory = JobMemory()
    failures = 0
    stop_task = asyncio.ensure_future(_stopped(stopped))
    try:
        while not stopped:
            seen_version = shared.wakeups.version(key)
            started = time.monotonic()
            try:
                next_at = await reconcile_once(
                    shared=shared,
                    key=key,
                    body=body,
                    pods=pods,
                    statefulsets=statefulsets,
                    nodes=nodes,
                    memory=memory,
                )
                failures = 0
            except Conflict:
                metrics.STATUS_WRITES.labels("conflict").inc()
                memory.written = None
                next_at = 0.0
                try:
                    memory.written = await shared.api.read_job(namespace, name)
                except Gone:
                    return
                except Exception:
                    log.exception("re-reading TrainJob %s/%s failed", namespace, name)
                    next_at = time.time() + 1.0
            except Gone:
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:
                failures += 1
                metrics.RECONCILE_ERRORS.labels(type(err).__name__).inc()
                delay = min(shared.config.error_backoff_max_seconds, 2.0 ** min(failures, 10))
                log.exception(
                    "reconcile of TrainJob %s/%s failed; retrying in %.0fs", namespace, name, delay
                )
                next_at = time.time() + delay
            finally:
                metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
                shared.last_pass = time.time()
            timeout = min(max(0.0, next_at - time.time()), shared.config.resync_seconds)
            woken = asyncio.ensure_future(shared.wakeups.wait(key, seen_version, timeout))
            await asyncio.wait({woken, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if not woken.done():
                woken.cancel()
                break
            if woken.result() != seen_version:
                # Passes are at least `debounce_seconds` apart: a wake-up after a quiet spell
                # (a pod lost while the group trained) is acted on at once, and a burst of
                # events (a group restart is dozens) still gets one pass per interval.
                settle = shared.config.debounce_seconds - (time.monotonic() - started)
                if settle > 0:
                    await asyncio.sleep(settle)
    finally:
        stop_task.cancel()
        shared.wakeups.forget(key)
        shared.evidence.pop(key, None)
        metrics.forget_job(namespace, name)
        _count_state(shared, memory, None)


async def _stopped(stopped: Any) -> None:
    await stopped.wait()


async def reconcile_once(
    *,
    shared: Shared,
    key: JobKey,
    body: Mapping[str, Any],
    pods: Mapping[JobKey, Iterable[Mapping[str, Any]]],
    statefulsets: Mapping[JobKey, Iterable[Mapping[str, Any]]],
    nodes: Mapping[str, Iterable[NodeFacts]],
    memory: JobMemory,
) -> float:
    """One pass; returns when (epoch seconds) the next pass is due if nothing happens."""
    api = shared.api
    if memory.written is not None and _rv(body) >= _rv(memory.written):
        memory.written = None  # the watch caught up with our last write
    job = freshest(body, memory.written)
    meta = job.get("metadata") or {}
    namespace, name = key
    if meta.get("deletionTimestamp"):
        return time.time() + shared.config.resync_seconds  # kopf stops us shortly

    defaults = shared.config.defaults
    if not memory.children_ensured:
        for child in children.runtime_children(job, defaults):
            await api.ensure(child)
        memory.children_ensured = True
        if not children.storage(job, defaults):
            api.event(job, NO_STORAGE)

    job_pods = [dict(p) for p in pods.get(key, ())]
    live = {str(p["metadata"].get("uid")) for p in job_pods}
    memory.deleted = {entry for entry in memory.deleted if entry[0] in live}
    memory.silent_going = {u: t for u, t in memory.silent_going.items() if u in live}
    facts = _node_facts(nodes, job_pods)
    sts = next(iter(statefulsets.get(key, ())), None)
    now = time.time()
    status = dict(job.get("status") or {})
    evidence = shared.evidence.get(key, {})
    current = int(status.get("attempt") or 0)
    observe.forget_evidence(evidence, current)
    observation = observe.observe(
        job, job_pods, facts, now=now, seen=memory.seen, evidence=evidence
    )
    spec = JobSpec.from_spec(job.get("spec") or {})
    decision = plan(spec, status, observation, jitter=shared.rng)

    _announce_runtime_conditions(shared, memory, job, status)
    patch = transitions.status_patch(status, decision.status)
    if patch is not None:
        resource_version = str(meta.get("resourceVersion", ""))
        memory.written = await api.write_status(namespace, name, resource_version, patch)
        metrics.STATUS_WRITES.labels("written").inc()
        _after_write(shared, job, status, decision.status)
    _count_state(shared, memory, decision.status.get("state"))
    observe.remember_running(memory.seen, decision.status, job_pods)
    _checkpoint_age(namespace, name, decision.status, now)

    next_at = now + shared.config.resync_seconds
    size = pool_size(spec, decision.status)
    sizing = (StartGroup, RestartGroup, Succeed, Fail, Suspend)  # each sizes the set itself
    if not any(isinstance(a, sizing) for a in decision.actions):
        await _resize_pool(shared, memory, job, sts, size)
    silent_due = await _force_silent(shared, memory, decision.status, job_pods, facts)
    if silent_due is not None:
        next_at = min(next_at, silent_due)
    for action in decision.actions:
        if isinstance(action, StartGroup | RestartGroup):
            record = GroupRecord.from_status(decision.status)
            await _run_attempt(
                shared,
                memory,
                job,
                sts,
                job_pods,
                facts,
                attempt=action.attempt,
                resume_from=action.resume_from,
                replicas=size,
                defaults=defaults,
                keep=action.keep if isinstance(action, RestartGroup) else (),
                mtbf_seconds=(
                    record.mtbf_seconds
                    if record is not None and record.attempt == action.attempt
                    else None
                ),
            )
        elif isinstance(action, Wait):
            next_at = min(next_at, action.until)
        elif isinstance(action, Succeed | Fail | Suspend):
            await _stop_group(shared, memory, job, sts, job_pods, facts)
        elif isinstance(action, DeleteJob):
            await api.delete_job(namespace, name, str(meta.get("uid")))
    return next_at


def _after_write(
    shared: Shared, job: Mapping[str, Any], old: Mapping[str, Any], new: Mapping[str, Any]
) -> None:
    """Metrics and events of the transitions just written (never before the write)."""
    reason = transitions.restart_reason(old, new)
    if reason is not None:
        kind = next(
            (
                str(e.get("kind"))
                for e in reversed(new.get("interruptions") or [])
                if e.get("reason") == reason
            ),
            "unknown",
        )
        metrics.RESTARTS.labels(kind, reason).inc()
    for event in transitions.events(old, new):
        meta = job.get("metadata") or {}
        log.info(
            "TrainJob %s/%s: %s: %s",
            meta.get("namespace"),
            meta.get("name"),
            event.reason,
            event.message,
        )
        shared.api.event(job, event)


def _announce_runtime_conditions(
    shared: Shared, memory: JobMemory, job: Mapping[str, Any], status: Mapping[str, Any]
) -> None:
    """Events for what the runtime recorded on the ledger since the last pass.

    On a loop's first pass only conditions set after the operator started are news: older
    ones were announced by the operator that ran then.
    """
    seen = memory.runtime_conditions
    if seen is None:
        started = format_time(shared.started)
        seen = {
            t: mark
            for t, mark in transitions.runtime_condition_marks(status).items()
            if mark[0] < started
        }
    for event in transitions.runtime_events(seen, status):
        shared.api.event(job, event)
    memory.runtime_conditions = transitions.runtime_condition_marks(status)


async def _run_attempt(
    shared: Shared,
    memory: JobMemory,
    job: Mapping[str, Any],
    sts: Mapping[str, Any] | None,
    pods: Iterable[Mapping[str, Any]],
    facts: Mapping[str, NodeFacts],
    *,
    attempt: int,
    resume_from: str | None,
    replicas: int,
    defaults: children.Defaults,
    keep: tuple[int, ...] = (),
    mtbf_seconds: float | None = None,
) -> None:
    """Makes the StatefulSet run `attempt`, then removes the pods of any other attempt.

    The old pods go only once the StatefulSet controller has seen the new template
    (observedGeneration caught up); otherwise it could recreate them from the old one.
    The loop is woken by the StatefulSet's own status update. The pods of the previous
    attempt whose index is in `keep` (a warm recovery) stay: they are relabelled to
    `attempt` (their launchers already follow status.group), and only the others are
    replaced, from the new template.
    """
    api = shared.api
    desired = children.statefulset(
        job,
        attempt=attempt,
        resume_from=resume_from,
        replicas=replicas,
        defaults=defaults,
        mtbf_seconds=mtbf_seconds,
    )
    want_hash = desired["metadata"]["annotations"][names.SPEC_HASH_ANNOTATION]
    if sts is None or sts.get("specHash") != want_hash or sts.get("replicas") != replicas:
        if not _recently_sent(memory, want_hash, replicas):
            if sts is None:
                await api.create_statefulset(desired)
            else:
                await api.replace_statefulset_spec(desired)
            memory.statefulset_sent = (want_hash, replicas, time.monotonic())
        return
    if (sts.get("observedGeneration") or 0) < (sts.get("generation") or 0):
        return
    for pod in pods:
        meta = pod["metadata"]
        label = meta.get("labels", {}).get(names.ATTEMPT_LABEL)
        if label == str(attempt):
            continue
        if label == str(attempt - 1) and _index(pod) in keep and not meta.get("deletionTimestamp"):
            await api.label_pod(
                meta["namespace"], meta["name"], str(meta["uid"]), names.ATTEMPT_LABEL, str(attempt)
            )
            continue
        # Fenced out: nothing it writes can be committed any more, and its name is wanted.
        grace = 0 if _trainer_never_ran(pod) else FENCED_POD_GRACE_SECONDS
        await _remove_pod(shared, memory, pod, facts, grace=grace)


async def _force_silent(
    shared: Shared,
    memory: JobMemory,
    status: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    facts: Mapping[str, NodeFacts],
) -> float | None:
    """Force-deletes the going pods of members a restart left behind as silent, once their
    kubelet has had SILENT_POD_FORCE_AFTER_SECONDS to confirm; returns when (epoch seconds)
    a pass must look again without an event, if one is still waited for.

    Their peers reported them silent and the group went on without them, so their attempt
    is fenced: whatever they still write is refused. A node that vanished without notice
    (powered off, cut off) has no kubelet to confirm a graceful deletion, the node
    controller declares it NotReady only after its grace (40 s or more), and the
    StatefulSet creates the pod that takes the name (the replacement, or the next spare)
    only once the old one is gone. A live kubelet (a frozen container, a partition of the
    pods' network only) confirms in a second or two, which is why the graceful deletion is
    asked first: its teardown frees the node's devices before a new pod could land there.
    """
    interruptions = status.get("interruptions") or ()
    again: float | None = None
    for pod in pods:
        meta = pod["metadata"]
        if not meta.get("deletionTimestamp"):
            continue
        try:
            attempt = int((meta.get("labels") or {}).get(names.ATTEMPT_LABEL, ""))
        except ValueError:
            continue
        if _index(pod) not in ledger.unresponsive(interruptions, attempt):
            continue
        since = memory.silent_going.setdefault(str(meta["uid"]), time.monotonic())
        wait = since + SILENT_POD_FORCE_AFTER_SECONDS - time.monotonic()
        if wait > 0:
            due = time.time() + wait
            again = due if again is None else min(again, due)
            continue
        await _remove_pod(shared, memory, pod, facts, force=True)
    return again


async def _resize_pool(
    shared: Shared,
    memory: JobMemory,
    job: Mapping[str, Any],
    sts: Mapping[str, Any] | None,
    pods: int,
) -> None:
    """spec.spares changed on a running attempt: its StatefulSet runs `pods` from now on.

    Only the size and the pool's env of the template change (children.pool_patch): the
    pods beyond the group come or go, the group itself is not restarted.
    """
    if sts is None or sts.get("replicas") in (None, 0, pods):
        return  # none yet, or stopped: the next StartGroup or RestartGroup sizes it
    spec_hash = str(sts.get("specHash"))
    if _recently_sent(memory, spec_hash, pods):
        return
    meta = job["metadata"]
    name = names.statefulset(meta["name"])
    await shared.api.patch_statefulset(meta["namespace"], name, children.pool_patch(job, pods))
    memory.statefulset_sent = (spec_hash, pods, time.monotonic())


def _trainer_never_ran(pod: Mapping[str, Any]) -> bool:
    """Whether the pod's trainer container has not run yet, as far as its status shows.

    Such a pod is most often the StatefulSet controller's stand-in for a lost pod, made
    from the old attempt's template the moment the lost one was gone. It holds no worker
    yet (the launcher starts them inside that container; one started since belongs to a
    fenced attempt, and nothing it writes is committed), so it is deleted at once (grace
    0): a graceful delete would wait for its kubelet to set up and tear down the sandbox
    before the new attempt's pod could take its name.
    """
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        states = (status.get("state") or {}, status.get("lastState") or {})
        if status.get("restartCount") or any("running" in s or "terminated" in s for s in states):
            return False
    return True


def _index(pod: Mapping[str, Any]) -> int | None:
    raw = (pod["metadata"].get("labels") or {}).get(names.POD_INDEX_LABEL)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


# How long a StatefulSet write may take to show in the watch before it is sent again.
RESEND_AFTER_SECONDS = 15.0
# The grace of a pod of an older attempt when a new attempt replaces it. The ledger refuses
# whatever it would still commit (its attempt is fenced), and its StatefulSet name is what
# the new attempt's pod waits for: a pod's full grace (30 s by default) would only delay
# the replacement. A preemption's final checkpoint is not cut short by it: the policy
# restarts only once the preempted replicas finished writing it (or rank 0 recorded that
# the group honoured the notice, after its final checkpoint). A pod whose trainer never
# ran goes with none (_trainer_never_ran).
FENCED_POD_GRACE_SECONDS = 1
# How long a silent member's pod (spotrun.lifecycle.peers) may take to go after it was
# seen going before it is force-deleted: a kubelet that answers needs the grace above and
# a second or two more.
SILENT_POD_FORCE_AFTER_SECONDS = 3.0


def _recently_sent(memory: JobMemory, spec_hash: str, replicas: int) -> bool:
    sent = memory.statefulset_sent
    return (
        sent is not None
        and sent[:2] == (spec_hash, replicas)
        and time.monotonic() - sent[2] < RESEND_AFTER_SECONDS
    )


async def _stop_group(
    shared: Shared,
    memory: JobMemory,
    job: Mapping[str, Any],
    sts: Mapping[str, Any] | None,
    pods: Iterable[Mapping[str, Any]],
    facts: Mapping[str, NodeFacts],
) -> None:
    """Suspended, Succeeded or Failed: scale to 0 (the pods go, the StatefulSet stays)."""
    meta = job["metadata"]
    if sts is not None and sts.get("replicas") != 0:
        spec_hash = str(sts.get("specHash"))
        if not _recently_sent(memory, spec_hash, 0):
            name = names.statefulset(meta["name"])
            await shared.api.scale_statefulset(meta["namespace"], name, 0)
            memory.statefulset_sent = (spec_hash, 0, time.monotonic())
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp") and _node_gone(pod, facts):
            await _remove_pod(shared, memory, pod, facts)


async def _remove_pod(
    shared: Shared,
    memory: JobMemory,
    pod: Mapping[str, Any],
    facts: Mapping[str, NodeFacts],
    grace: int | None = None,
    *,
    force: bool = False,
) -> None:
    """Deletes the pod (with `grace`), forced when its node is gone or `force` says so."""
    meta = pod["metadata"]
    force = force or _node_gone(pod, facts)
    if meta.get("deletionTimestamp") and not force:
        return  # already going; its kubelet confirms the end
    if (str(meta["uid"]), force) in memory.deleted:
        return  # asked already; the watch has not shown it yet
    await shared.api.delete_pod(
        meta["namespace"], meta["name"], str(meta["uid"]), force=force, grace=grace
    )
    memory.deleted.add((str(meta["uid"]), force))


def _node_facts(
    nodes: Mapping[str, Iterable[NodeFacts]], pods: Iterable[Mapping[str, Any]]
) -> dict[str, NodeFacts]:
    """The health of the nodes the job's pods are bound to (absent: the node is gone)."""
    facts: dict[str, NodeFacts] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if node and node not in facts:
            found = next(iter(nodes.get(node, ())), None)
            if found is not None:
                facts[node] = found
    return facts


def _node_gone(pod: Mapping[str, Any], facts: Mapping[str, NodeFacts]) -> bool:
    node = (pod.get("spec") or {}).get("nodeName")
    if not node:
        return False
    fact = facts.get(str(node))
    return fact is None or fact.lost_reason in GONE_REASONS


def _checkpoint_age(namespace: str, name: str, status: Mapping[str, Any], now: float) -> None:
    latest = status.get("latestCheckpoint") or {}
    if status.get("state") in ("Running", "Restarting", "Pending") and latest.get("time"):
        with contextlib.suppress(ValueError):
            metrics.CHECKPOINT_AGE.labels(namespace, name).set(
                max(0.0, now - parse_time(str(latest["time"])))
            )
    else:
        metrics.forget_job(namespace, name)


def _count_state(shared: Shared, memory: JobMemory, state: str | None) -> None:
    if state == memory.state:
        return
    if memory.state is not None:
        shared.states[memory.state] -= 1
        metrics.JOBS.labels(memory.state).set(shared.states[memory.state])
    if state is not None:
        shared.states[state] += 1
        metrics.JOBS.labels(state).set(shared.states[state])
    memory.state = state
