"""Wakes a TrainJob's reconcile loop when something of that job changed.

The loop otherwise sleeps until its next deadline (a backoff's end, a progress deadline,
a resync). Watch handlers on the job's pods, StatefulSet and the TrainJob itself `poke`
its key; the loop `wait`s on its own asyncio.Condition, so one busy job never wakes the
others. A poke that lands while the loop is busy is not lost: the version counter says
there is news, and the next wait returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

JobKey = tuple[str, str]  # (namespace, name)


@dataclass
class _Slot:
    condition: asyncio.Condition = field(default_factory=asyncio.Condition)
    version: int = 0


class Wakeups:
    """One condition per job; created on first use, dropped when the job's loop ends."""

    def __init__(self) -> None:
        self._slots: dict[JobKey, _Slot] = {}

    def _slot(self, key: JobKey) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        return slot

    def version(self, key: JobKey) -> int:
        return self._slot(key).version

    async def poke(self, key: JobKey) -> None:
        slot = self._slots.get(key)
        if slot is None:
            return  # no loop for this job (yet): it reads everything when it starts
        async with slot.condition:
            slot.version += 1
            slot.condition.notify_all()

    async def wait(self, key: JobKey, seen: int, timeout: float) -> int:
        """Waits until a poke newer than `seen`, or `timeout`; returns the version now."""
        slot = self._slot(key)
        async with slot.condition:
            if slot.version == seen and timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        slot.condition.wait_for(lambda: slot.version != seen), timeout
                    )
            return slot.version

    def forget(self, key: JobKey) -> None:
        self._slots.pop(key, None)

    def __len__(self) -> int:
        return len(self._slots)
