"""The worker of `spotrun run --fail-rank N`: the training code, with an application error in rank N.

An injected application failure has to look like the real thing: an exception raised
inside one training process, mid-training, that kills it with a traceback and a non-zero
exit while the other ranks are left waiting in a collective. Neither the launcher nor the
training code knows about it: `spotrun run` starts every worker through this module, which
runs the trainer unchanged, except that in rank N (`SPOTRUN_INJECT_FAIL_RANK`) the
`SPOTRUN_INJECT_FAIL_AFTER`-th call to `spotrun.report()` raises InjectedFailure before
reporting. Every attempt of the job fails the same way, as a deterministic bug would, so
the failure budget runs out.

    python -m spotrun.local._fault_worker module:fn                 # a trainer.function
    python -m spotrun.local._fault_worker -- train.py [args...]     # trainer.command [python, train.py]
    python -m spotrun.local._fault_worker -- -m package.train [args...]
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Mapping, Sequence
from typing import Any

FAIL_RANK = "SPOTRUN_INJECT_FAIL_RANK"
FAIL_AFTER = "SPOTRUN_INJECT_FAIL_AFTER"
DEFAULT_FAIL_AFTER = 5


class InjectedFailure(RuntimeError):
    """The application error `spotrun run --fail-rank` asked for."""


def fail_after(env: Mapping[str, str]) -> int | None:
    """The report count at which this worker fails, or None if it is not the rank to fail."""
    target = env.get(FAIL_RANK, "")
    if target == "" or env.get("RANK") != target:
        return None
    return int(env.get(FAIL_AFTER) or DEFAULT_FAIL_AFTER)


def install(rank: int, after: int) -> None:
    """Makes the `after`-th spotrun.report() of this process raise InjectedFailure."""
    from spotrun.train.session import Session

    original = Session.report
    calls = 0

    def report(self: Session, metrics: Mapping[str, Any], checkpoint: Any = None) -> None:
        nonlocal calls
        calls += 1
        if calls >= after:
            raise InjectedFailure(
                f"injected by `spotrun run --fail-rank {rank}`: rank {rank} fails at its "
                f"report {calls} (step {metrics.get('step', '?')})"
            )
        original(self, metrics, checkpoint)

    Session.report = report  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trainer named by `argv`, with the failure installed in the chosen rank."""
    args = list(sys.argv[1:] if argv is None else argv)
    after = fail_after(os.environ)
    if after is not None:
        install(int(os.environ["RANK"]), after)
    if args and args[0] != "--":
        from spotrun.train import _function_worker

        return _function_worker.main(args[:1])
    args = args[1:]
    if not args:
        raise SystemExit(
            "spotrun.local._fault_worker: expected module:fn, or -- followed by a script"
        )
    if args[0] == "-m" and len(args) > 1:
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        return 0
    script = args[0]
    sys.argv = [script, *args[1:]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
