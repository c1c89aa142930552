"""How long to wait before a group restart after a failure: exponential, jittered.

Restarting at once after a crash turns a bad node or a bad checkpoint into a tight
loop that hammers the scheduler and the bucket; jitter keeps many jobs failing together
from restarting in lockstep. A preemption restarts without backoff: it is the capacity
going, not the job failing, and a replacement that cannot be scheduled waits in the
scheduler, not here. A group that ran steadily for RESET_AFTER_SECONDS
since its last recovery starts again from the initial delay, as the kubelet's
crash-loop backoff does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spotrun.lifecycle.spec import Backoff
from spotrun.lifecycle.times import parse_time

RESET_AFTER_SECONDS = 600.0


def delay(backoff: Backoff, consecutive: int, draw: float) -> float:
    """Seconds to wait before the restart after the `consecutive`-th interruption in a row.

    The base doubles from `initial_seconds` up to `max_seconds`; `draw` (uniform in
    [0, 1)) takes up to `jitter` of it off, so the delay never exceeds the maximum.
    """
    if consecutive < 1:
        raise ValueError(f"consecutive counts the interruption being handled, got {consecutive}")
    if not 0.0 <= draw < 1.0:
        raise ValueError(f"draw must be in [0, 1), got {draw}")
    base = min(backoff.max_seconds, backoff.initial_seconds * 2.0 ** min(consecutive - 1, 62))
    return base * (1.0 - backoff.jitter * draw)


def consecutive(interruptions: Sequence[Mapping[str, Any]]) -> int:
    """How many failures (hangs included) at the end of the ledger followed each other closely.

    Two failures are in a row when the second came less than RESET_AFTER_SECONDS after the
    group recovered from the first (or the first never recovered). Preemptions are not a
    crash loop: they are skipped, neither counted nor breaking a run of failures, and so are
    elastic resizes.
    """
    count = 0
    later: float | None = None
    for entry in reversed(interruptions):
        if entry.get("kind") in ("preemption", "resize"):
            continue
        if later is not None:
            recovered = entry.get("secondsToRecover")
            if recovered is not None:
                healthy_since = parse_time(str(entry["time"])) + float(recovered)
                if later - healthy_since >= RESET_AFTER_SECONDS:
                    break
        count += 1
        later = parse_time(str(entry["time"]))
    return count
