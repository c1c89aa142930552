"""The worker of a script trainer in a warm recovery: `python script.py` run in-process, again.

A script's process cannot be re-entered like a function, so the launcher starts
`python -m spotrun.train._script_worker script.py ARGS` (or `-m module ARGS`) instead of
`python script.py ARGS`: this runs the script as `__main__` (runpy), and when the group
loses a member it joins the next group and runs the script again in the same process,
with torch (and, on GPUs, the CUDA context) still loaded. The script's get_checkpoint()
then returns the newest state, served from memory.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence

from spotrun.train import _exit, regroup
from spotrun.train import session as sessions
from spotrun.train._function_worker import (
    await_next_group,
    await_promotion,
    join_after_abandoned,
    start_writer_early,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m spotrun.train._script_worker [-m module | script] ARGS")
    module = args[0] == "-m"
    if module and len(args) < 2:
        raise SystemExit("spotrun.train._script_worker: -m needs a module name")
    target, rest = (args[1], args[2:]) if module else (args[0], args[1:])
    start_writer_early()
    await_promotion()
    while True:
        sys.argv = [target, *rest]
        try:
            if module:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
            if sessions._session is not None:
                sessions._session.finish()
        except BaseException as err:
            current = sessions._session
            if current is None and isinstance(err, regroup.Regroup):
                join_after_abandoned(err)  # its first session's rendezvous was given up
                continue
            if current is None or not await_next_group(current, err):
                raise
            continue
        return 0


if __name__ == "__main__":
    _exit.run(main)
