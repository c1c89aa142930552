"""What local mode's processes look like to the lifecycle policy: Observations from exits.

The operator turns pods and nodes into `spotrun.lifecycle.Observation`s; `spotrun run` turns
its replica launchers into the same thing, so both are supervised by the same decisions.
The facts differ: locally a replica is one `spotrun launch` process, it is running until it
exits, and it is preempted only when the supervisor itself injected a fault into it (it
knows, since it sent the signal). The judgement is the policy's: a replica killed by an
injected fault is flagged `preempted`, and the other replicas that crash of it (their
collectives lose a peer) are left as plain failures for `classify` to fold into that one
preemption. Pure code over plain data, so each rule has a table test.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from spotrun.lifecycle import (
    EXIT_PREEMPTED,
    Observation,
    Phase,
    ReplicaObservation,
    format_time,
    parse_time,
)
from spotrun.lifecycle.observation import UNSCHEDULABLE
from spotrun.local.faults import REASONS, FaultKind

# Kubernetes' reasons for a terminated container, reused so that status reads the same.
COMPLETED = "Completed"
ERROR = "Error"


@dataclass(frozen=True)
class ReplicaFacts:
    """What the supervisor knows of one replica launcher process.

    `returncode` follows subprocess (None while running, -N when killed by signal N).
    `fault` is the fault the supervisor injected into it, if any. `stopping` says the
    supervisor asked it to go away (a replica of an older attempt, or the job is over).
    `log` is where its output goes, named in failure messages.
    """

    index: int
    attempt: int
    returncode: int | None = None
    fault: FaultKind | None = None
    stopping: bool = False
    log: str | None = None

    @property
    def running(self) -> bool:
        return self.returncode is None

    @property
    def exit_code(self) -> int | None:
        """The shell's exit code: 128 + N for a process killed by signal N."""
        if self.returncode is None:
            return None
        return 128 - self.returncode if self.returncode < 0 else self.returncode


def describe_exit(returncode: int) -> str:
    """`exited with code 1`, `killed by SIGKILL`: how a process ended, for people."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


def replica_observation(facts: ReplicaFacts) -> ReplicaObservation:
    """One replica as the policy sees it.

    Running until the launcher exits; then succeeded (0) or failed (any other code; 75 is
    the preemption notice honoured, which `classify` recognises by the code: the launcher
    exits 75 only for a notice it vouches for, never for user code exiting 75 on its own). An injected
    fault flags the replica preempted from the moment the signal is sent, so the other
    replicas' crashes that follow are never read as application failures first.
    """
    code = facts.exit_code
    phase: Phase
    reason: str | None
    if code is None:
        phase, reason = "running", None
    elif code == 0:
        phase, reason = "succeeded", COMPLETED
    else:
        phase, reason = "failed", ERROR
    notes = []
    if facts.returncode is not None and code not in (0, EXIT_PREEMPTED):
        if facts.returncode < 0:
            notes.append(describe_exit(facts.returncode))
        if facts.log:
            notes.append(f"log: {facts.log}")
    message = "; ".join(notes) or None
    return ReplicaObservation(
        index=facts.index,
        attempt=facts.attempt,
        phase=phase,
        exit_code=code,
        reason=reason,
        preempted=facts.fault in REASONS,
        preemption_reason=REASONS.get(facts.fault) if facts.fault is not None else None,
        ready=phase == "running" and not facts.stopping,
        deleting=facts.stopping,
        message=message,
    )


def observe(
    replicas: Iterable[ReplicaFacts],
    status: Mapping[str, Any],
    *,
    now: float,
    suspended: bool = False,
    held: Mapping[int, float] | None = None,
) -> Observation:
    """The Observation of a local job from its replica processes and its status.json.

    Replicas of older attempts are included only while they still run: once one has
    exited it is gone, as a deleted pod is. Progress and completion come from the fields
    rank 0 wrote into the status (lastMetrics.time; completion of the current attempt).
    `held` maps the replicas `--unavailable-for` keeps back to when their capacity
    returns: with no process of the current attempt, each is seen as a pod the scheduler
    cannot place.
    """
    attempt = int(status.get("attempt") or 0)
    replicas = list(replicas)
    seen = tuple(replica_observation(r) for r in replicas if r.attempt == attempt or r.running)
    present = {r.index for r in replicas if r.attempt == attempt}
    seen += tuple(
        ReplicaObservation(
            index=index,
            attempt=attempt,
            phase="pending",
            waiting_reason=UNSCHEDULABLE,
            message=f"no capacity until {format_time(until)} (--unavailable-for)",
        )
        for index, until in sorted((held or {}).items())
        if attempt and index not in present
    )
    last = (status.get("lastMetrics") or {}).get("time")
    completion = status.get("completion") or {}
    completed = attempt > 0 and bool(completion) and int(completion.get("attempt", -1)) == attempt
    return Observation(
        now=now,
        replicas=seen,
        last_progress_time=parse_time(str(last)) if last else None,
        completed=completed,
        suspended=suspended,
        generation=1,
    )
