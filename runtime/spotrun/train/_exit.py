"""How spotrun's own torch processes end: as the interpreter would, less its final collection.

A process that imported torch (and torch._dynamo, which DDP imports) spends 0.6-0.8 s of
its exit in the interpreter's last garbage collections, walking torch's object graph
only to free memory the kernel frees anyway (py-spy: `gc_collect_main` under
Py_FinalizeEx). A preempted worker's exit, and its writer's, lie on a warm recovery's
critical path: the next group is published once the leaving replica is gone. So the
worker and writer entries end here: the steps of an ordinary exit that code can observe
(non-daemon threads joined, atexit handlers run, stdio flushed), then `os._exit`.

`multiprocessing` ends its children with os._exit for a similar reason; unlike it, the
atexit handlers (the user's, logging's, the session's) still run. An uncaught exception
is left to the ordinary exit: its traceback and excepthooks are what a failure needs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def run(main: Callable[[], int | None]) -> NoReturn:
    """main(), then this process exits with its code (or its SystemExit's) at once."""
    try:
        code = exit_code(main())
    except SystemExit as err:
        code = exit_code(err.code)
    exit_now(code)


def exit_code(code: object) -> int:
    """An exit code as the interpreter maps SystemExit's: None 0, an int itself, else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def exit_now(code: int) -> NoReturn:
    """Exits with `code` after what an ordinary exit does first, skipping its final collection."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(code)
