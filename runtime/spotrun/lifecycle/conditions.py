"""metav1.Condition bookkeeping: set a condition without losing when it last changed.

`lastTransitionTime` moves only when `status` flips, not when the reason or message
changes (JobSet and the Kubernetes API conventions agree), so `kubectl wait` and alerts
see real transitions, and a pass that only rewords a message does not look like news.
Conditions of types the caller does not touch (the runtime's CheckpointCorrupt) are kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from spotrun.lifecycle.times import format_time

RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
PODS_READY = "PodsReady"
CHECKPOINT_CORRUPT = "CheckpointCorrupt"
LEDGER_REPAIRED = "LedgerRepaired"

# The condition types the policy writes; the runtime owns CheckpointCorrupt and
# LedgerRepaired (an attempt resumed from a committed checkpoint the status did not name).
POLICY_TYPES = (RUNNING, SUCCEEDED, FAILED, SUSPENDED, PODS_READY)

# metav1.Condition's pattern for `reason`; the API server rejects the whole status
# write if one reason does not match, and reasons here can come from observed pods.
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
_REASON_MAX = 1024


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: float,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """A copy of `conditions` with `type_` set; its place in the list is kept."""
    value = "True" if status else "False"
    reason = _valid_reason(reason)
    out = [dict(c) for c in conditions]
    for i, old in enumerate(out):
        if old.get("type") == type_:
            changed = old.get("status") != value
            out[i] = _condition(
                type_,
                value,
                reason,
                message,
                now=format_time(now) if changed else str(old.get("lastTransitionTime")),
                generation=generation,
            )
            return out
    out.append(
        _condition(type_, value, reason, message, now=format_time(now), generation=generation)
    )
    return out


def find(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    """The condition of `type_`, if present."""
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: Sequence[Mapping[str, Any]], type_: str) -> bool:
    """Whether a condition of `type_` is present with status True."""
    found = find(conditions, type_)
    return found is not None and found.get("status") == "True"


def _condition(
    type_: str, status: str, reason: str, message: str, *, now: str, generation: int | None
) -> dict[str, Any]:
    condition: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def _valid_reason(reason: str) -> str:
    if _REASON.match(reason) and len(reason) <= _REASON_MAX:
        return reason
    cleaned = re.sub(r"[^A-Za-z0-9_,:]", "", reason).lstrip("0123456789_,:").rstrip(",:")
    return cleaned[:_REASON_MAX].rstrip(",:") or "Unknown"
