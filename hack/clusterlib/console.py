"""What hack/cluster (and hack/images) tells its user: progress on stderr, and the error type for the user.

Stdout carries only answers (`bin`, `env`, the exports of `up`), so that
`$(hack/cluster bin helm)` works; everything else goes through `say`.
"""

from __future__ import annotations

import sys

# The prefix of every message: the command that runs (hack/images sets "images").
PROG = ["cluster"]


def say(msg: str) -> None:
    print(f"{PROG[0]}: {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    """An error for the user: what happened and what to do next."""


def fmt_secs(secs: float) -> str:
    m, s = divmod(int(secs), 60)
    return f"{m}m{s:02d}s" if m else f"{secs:.1f}s"
