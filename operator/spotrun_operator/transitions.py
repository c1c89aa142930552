"""What a pass changed in the status: the patch to write, and the events it deserves.

Pure. The status is written once per pass and only when a field the policy owns changed,
so an idle job costs no writes (each write would be a watch event for every watcher).
Events are derived from the same before/after pair, so they announce transitions only,
and the caller posts them after the status write succeeded (JobSet does the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from spotrun.lifecycle import OWNED_FIELDS

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class Event:
    """A Kubernetes event about the TrainJob."""

    type: EventType
    reason: str
    message: str


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """A merge patch of `status` with the owned fields that differ; None when none does.

    Lists (conditions, interruptions) are written whole: the caller fences the write with
    the resourceVersion it read, so a list another writer changed meanwhile is not lost.
    A field the policy dropped is removed with null, and so is a key dropped from an object
    field (status.group).
    """
    patch: dict[str, Any] = {}
    for name in OWNED_FIELDS:
        if name in new:
            if old.get(name) != new[name]:
                value = new[name]
                before = old.get(name)
                if isinstance(value, Mapping) and isinstance(before, Mapping):
                    # A merge patch merges objects: a key the policy dropped (an elastic
                    # group's members once it is whole again) must be removed with null.
                    value = {**{k: None for k in before if k not in value}, **value}
                patch[name] = value
        elif name in old:
            patch[name] = None
    return patch or None


def restart_reason(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The interruption's reason when this pass restarted the group (attempt went up)."""
    if int(new.get("attempt") or 0) <= int(old.get("attempt") or 0) or not old.get("attempt"):
        return None
    if old.get("state") == "Suspended":
        return None
    entries: Sequence[Mapping[str, Any]] = new.get("interruptions") or []
    for entry in reversed(entries):
        if entry.get("attempt") == int(old.get("attempt") or 0):
            return str(entry.get("reason", "Unknown"))
    return "Unknown"


def events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """The events for the transitions from `old` to `new` status, in the order they happened."""
    out: list[Event] = []
    old_entries: Sequence[Mapping[str, Any]] = old.get("interruptions") or []
    new_entries: Sequence[Mapping[str, Any]] = new.get("interruptions") or []
    known = {(e.get("time"), e.get("attempt")) for e in old_entries}
    for entry in new_entries:
        if (entry.get("time"), entry.get("attempt")) in known:
            continue
        kind = entry.get("kind")
        if kind == "resize":
            # An elastic group went on with fewer replicas (a warning: it trains below its
            # target), or grew back.
            shrunk = int(entry.get("toReplicas", 0)) < int(entry.get("fromReplicas", 0))
            out.append(
                Event(
                    "Warning" if shrunk else "Normal",
                    "GroupShrunk" if shrunk else "GroupGrown",
                    f"{entry.get('fromReplicas')} -> {entry.get('toReplicas')} replicas "
                    f"({entry.get('reason')}): {entry.get('message', '')}",
                )
            )
            continue
        label = {"preemption": "Preempted", "hang": "Hung"}.get(str(kind), "Failed")
        out.append(
            Event(
                "Warning" if kind != "preemption" else "Normal",
                f"Attempt{label}",
                f"attempt {entry.get('attempt')} {label.lower()} ({entry.get('reason')}): "
                f"{entry.get('message', '')}",
            )
        )
    old_attempt, new_attempt = int(old.get("attempt") or 0), int(new.get("attempt") or 0)
    if new_attempt != old_attempt:
        reason = restart_reason(old, new)
        if reason is not None:
            out.append(
                Event(
                    "Normal",
                    "GroupRestarted",
                    f"restarting as attempt {new_attempt} after {reason}",
                )
            )
        else:
            out.append(Event("Normal", "GroupStarted", f"starting attempt {new_attempt}"))
    old_state, new_state = old.get("state"), new.get("state")
    if new_state != old_state and new_state in ("Running", "Suspended", "Succeeded", "Failed"):
        if new_state == "Failed":
            failed = _condition(new, "Failed")
            out.append(
                Event(
                    "Warning", str(failed.get("reason", "Failed")), str(failed.get("message", ""))
                )
            )
        else:
            out.append(Event("Normal", str(new_state), f"the job is {str(new_state).lower()}"))
    old_ready, new_ready = _condition(old, "PodsReady"), _condition(new, "PodsReady")
    if (
        new_ready.get("status") == "False"
        and new_ready.get("reason") != old_ready.get("reason")
        and new_ready.get("reason")
        in (
            "ImagePullBackOff",
            "Unschedulable",
            "CreateContainerConfigError",
            "CreateContainerError",
        )
    ):
        out.append(Event("Warning", str(new_ready["reason"]), str(new_ready.get("message", ""))))
    return out


# Conditions the runtime (rank 0) sets on the ledger, and the events they deserve.
RUNTIME_CONDITIONS = {
    "CheckpointCorrupt": "CheckpointFellBack",
    "LedgerRepaired": "LedgerRepaired",
}


def runtime_condition_marks(status: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """(lastTransitionTime, message) of each runtime condition that is True."""
    return {
        str(c["type"]): (str(c.get("lastTransitionTime", "")), str(c.get("message", "")))
        for c in status.get("conditions") or []
        if c.get("type") in RUNTIME_CONDITIONS and c.get("status") == "True"
    }


def runtime_events(seen: Mapping[str, tuple[str, str]], status: Mapping[str, Any]) -> list[Event]:
    """Warnings for the runtime's ledger conditions that are new (or reworded) since `seen`.

    The runtime cannot post events itself (its Role only patches its job's status), so the
    operator tells people when an attempt fell back past a corrupt checkpoint, or resumed
    from a committed checkpoint the status did not name.
    """
    out = []
    for type_, mark in runtime_condition_marks(status).items():
        if seen.get(type_) != mark:
            out.append(Event("Warning", RUNTIME_CONDITIONS[type_], mark[1]))
    return out


def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            found: Mapping[str, Any] = cond
            return found
    return {}
