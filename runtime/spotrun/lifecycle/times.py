"""RFC 3339 timestamps for status fields, from and to the policy's float seconds.

The policy computes with floats (seconds since the epoch, passed in by the caller);
Kubernetes status carries strings. Milliseconds are kept when present so that a
recovery time measured in local mode is not rounded to whole seconds.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

# What format_time keeps: a time read back from the status may lie up to half of this after
# the float it was written from (rounded to the nearest millisecond).
RESOLUTION_SECONDS = 0.001


def format_time(seconds: float) -> str:
    """`2024-05-01T12:00:00Z`, or `2024-05-01T12:00:00.250Z` when there is a fraction."""
    millis = round(seconds * 1000)
    moment = dt.datetime.fromtimestamp(millis // 1000, dt.UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if millis % 1000:
        text += f".{millis % 1000:03d}"
    return text + "Z"


def parse_time(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 time (`Z` or an offset; fraction optional)."""
    moment = dt.datetime.fromisoformat(text.replace("z", "Z"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def positive_seconds(raw: Any) -> float | None:
    """A positive, finite number of seconds from a status field or an env value, else None."""
    if raw is None or isinstance(raw, bool):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None
