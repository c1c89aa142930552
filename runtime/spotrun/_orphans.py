"""No orphans: a child spotrun starts dies with the process that started it.

Launchers, workers and checkpoint writers all set PR_SET_PDEATHSIG, so a SIGKILLed parent (a
preempted pod's launcher, a killed local supervisor, a crashed worker) never leaves training
processes behind holding GPUs, ports or half-written checkpoints.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    # Loaded before fork: dlopen in the child of a forked process is not async-signal-safe.
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int, *, ignore_sigint: bool = False) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when `parent_pid` dies.

    `ignore_sigint` leaves a terminal's Ctrl-C to the parent, which turns it into its own
    orderly shutdown.
    """
    prctl = _prctl()

    def preexec() -> None:
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            # The parent died between fork and prctl: the death signal will never come.
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def die_with_parent_now(parent_pid: int) -> None:
    """The same, called by a child already running (one started with `python -m`)."""
    die_with_parent(parent_pid)()
