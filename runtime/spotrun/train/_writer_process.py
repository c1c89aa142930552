"""The checkpoint writer process's entry: it dies with its training process from the start.

spotrun.train.writer loads torch, which takes seconds; a parent-death signal armed only
after that import left a window in which a SIGKILLed training process (a killed `spotrun
run`, a preempted pod's whole tree) left its writer running until the import ended. This
module imports nothing heavy: it arms PR_SET_PDEATHSIG, then loads the writer.
"""

from __future__ import annotations

import os

from spotrun._orphans import die_with_parent_now
from spotrun.train import _exit


def main() -> None:
    die_with_parent_now(int(os.environ.get("SPOTRUN_WRITER_PARENT", os.getppid())))
    from spotrun.train import writer

    writer.main()


if __name__ == "__main__":
    _exit.run(main)
