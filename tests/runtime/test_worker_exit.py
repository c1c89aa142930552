"""How spotrun's worker and writer processes end: what an ordinary exit does, less its last
collection (spotrun.train._exit), and how `spotrun run` stops a replica."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spotrun.local import supervisor
from tests.runtime.helpers import PYTHONPATH

PROGRAM = textwrap.dedent(
    """
    import atexit, gc, sys, threading, time
    from pathlib import Path
    from spotrun.train import _exit

    mode, folder = sys.argv[1], Path(sys.argv[2])

    class Cyclic:
        def __del__(self):
            (folder / "collected").write_text("yes")

    def main():
        atexit.register(lambda: (folder / "atexit").write_text("ran"))
        def late():
            time.sleep(0.3)
            (folder / "thread").write_text("done")
        threading.Thread(target=late).start()
        gc.disable()  # the cycle stays until an exit's final collection
        cycle = Cyclic()
        cycle.me = cycle
        del cycle
        sys.stdout.write("unflushed output")
        if mode == "return":
            return 3
        if mode == "none":
            return None
        if mode == "preempted":
            raise SystemExit(75)
        if mode == "message":
            raise SystemExit("a message instead of a code")
        raise RuntimeError("the training code failed")

    _exit.run(main)
    """
)


def run_program(mode: str, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, mode, str(folder)],
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("mode", "code"), [("return", 3), ("none", 0), ("preempted", 75)])
def test_a_worker_exits_with_its_code_after_its_threads_atexit_handlers_and_output(
    tmp_path: Path, mode: str, code: int
) -> None:
    result = run_program(mode, tmp_path)
    assert result.returncode == code, result.stderr
    assert result.stdout == "unflushed output"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"
    # What it skips: the interpreter's last collection (0.6-0.8 s with torch._dynamo loaded).
    assert not (tmp_path / "collected").exists()


def test_a_system_exit_with_a_message_prints_it_and_exits_1(tmp_path: Path) -> None:
    result = run_program("message", tmp_path)
    assert result.returncode == 1
    assert "a message instead of a code" in result.stderr
    assert (tmp_path / "atexit").read_text() == "ran"


def test_an_uncaught_error_takes_the_ordinary_exit_with_its_traceback(tmp_path: Path) -> None:
    result = run_program("raise", tmp_path)
    assert result.returncode == 1
    assert "RuntimeError: the training code failed" in result.stderr
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "collected").read_text() == "yes"


def replica(code: str) -> supervisor._Replica:
    """A process standing in for a launcher, once it runs `code` and says so."""
    process = subprocess.Popen(
        [sys.executable, "-c", f"{code}; print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    return supervisor._Replica(index=0, attempt=1, process=process, log="")


def wait_for_exit(rep: supervisor._Replica, now: float, until: float) -> float:
    """Drives enforce() with a simulated clock until the process exits; returns that time."""
    while now < until:
        rep.enforce(now)
        time.sleep(0.05)
        if rep.poll():
            return now
        now += 0.5
    rep.kill()
    raise AssertionError(f"replica still running at t={until}")


def test_a_replica_asked_to_finish_gets_its_time_then_sigterm_then_sigkill() -> None:
    # Exits on SIGTERM: nothing is sent before term_after, SIGTERM then.
    polite = replica("import time")
    polite.stop(0.0, grace=10.0, term_after=2.0)
    assert wait_for_exit(polite, 0.0, 30.0) >= 2.0
    assert polite.returncode == -15
    # Ignores SIGTERM: SIGKILL once the grace after SIGTERM ends.
    stubborn = replica("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    stubborn.stop(0.0, grace=3.0, term_after=2.0)
    assert wait_for_exit(stubborn, 0.0, 30.0) >= 5.0
    assert stubborn.returncode == -9
