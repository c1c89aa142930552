"""The processes hack/cluster runs: commands, and the daemons of a run dir.

A daemon starts in its own session with its log under the run dir and is recorded in
state.json at once; it is found again by that record or by its command line naming the run
dir, and stopped by process group, SIGTERM first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .build import ensure
from .console import Failure, say
from .rundir import RunDir
from .topology import COMPONENTS, NODE_COMPONENTS, SHIM


def sh(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input, check=False)
    if check and proc.returncode != 0:
        raise Failure(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stderr.strip()}")
    return proc


def alive(pid: int) -> bool:
    """True while PID runs (a zombie, waiting for its reaper, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for kid in _children(todo.pop()):
            out.append(kid)
            todo.append(kid)
    return out


def start(run: RunDir, name: str, args: list[str]) -> int:
    """Starts NAME in its own session (process group), logging to logs/NAME.log."""
    binary = shutil.which(name) if name == "containerd" else None
    cmd = [binary or str(ensure(name)), *args]
    with open(run.log(name), "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=run.root,
            start_new_session=True,
        )
    # Recorded at once, so that `down` finds it even if `up` fails right after.
    state = run.read_state()
    state["processes"][name] = {"pid": proc.pid, "binary": cmd[0]}
    run.write_state(state)
    (run.root / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def log_tail(run: RunDir, name: str, lines: int = 25) -> str:
    try:
        text = run.log(name).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text[-lines:])


def wait_for(what: str, check: Any, timeout: float, run: RunDir, watch: Sequence[str] = ()) -> None:
    """Polls CHECK() until it returns true; fails early if a watched component exited."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except Exception as e:  # keep polling; the last error is reported
            last = e
        if last is True:
            return
        state = run.read_state()
        for name in watch:
            pid = state["processes"].get(name, {}).get("pid")
            if pid is not None and not alive(pid):
                raise Failure(
                    f"{name} exited while waiting for {what}; last lines of {run.log(name)}:\n"
                    + log_tail(run, name)
                )
        if time.monotonic() > deadline:
            detail = "" if last in (False, None) else f" (last answer: {last})"
            logs = "\n".join(f"--- {run.log(n)}\n{log_tail(run, n, 10)}" for n in watch)
            raise Failure(f"timed out after {timeout:.0f}s waiting for {what}{detail}\n{logs}")
        time.sleep(0.25)


def our_processes(run: RunDir) -> dict[int, str]:
    """PIDs of processes started for RUN: recorded ones, plus any whose command line names RUN."""
    found: dict[int, str] = {}
    state = run.read_state()
    for name, proc in state["processes"].items():
        pid = int(proc["pid"])
        if alive(pid) and proc.get("binary") in cmdline(pid):
            found[pid] = name
    marker = str(run.root) + "/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in found or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        args = cmdline(pid)
        # Only the daemons this script starts; never the caller (pytest, a shell in RUN).
        ours = (
            args
            and Path(args[0]).name in (*COMPONENTS, *NODE_COMPONENTS, SHIM)
            and any(marker in a for a in args[1:])
        )
        if ours and alive(pid):
            found[pid] = Path(args[0]).name
    return found


def signal_process(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # Each component leads its own process group; signal the group, so helpers go too.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def stop(procs: dict[int, str], grace: float, quiet: bool) -> None:
    """SIGTERM, then SIGKILL after GRACE seconds; returns once all of PROCS are gone (or 5s)."""
    for pid, name in procs.items():
        if not quiet:
            say(f"stopping {name} (pid {pid})")
        signal_process(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, name in procs.items():
        if alive(pid):
            say(f"{name} (pid {pid}) still runs {grace:.0f}s after SIGTERM; killing it")
            signal_process(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
