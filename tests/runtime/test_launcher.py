"""`spotrun launch` with real worker processes: environment, exit codes, signals, orphans."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spotrun import contract
from spotrun.contract import EXIT_PREEMPTED
from spotrun.local.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60

pytestmark = pytest.mark.timeout(TIMEOUT)

# Every worker script records its pid, then does what its test needs.
PRELUDE = """
import json, os, signal, sys, time
from pathlib import Path
OUT = Path(os.environ["TEST_OUT"])
LOCAL_RANK = int(os.environ["LOCAL_RANK"])
(OUT / f"pid-{LOCAL_RANK}").write_text(str(os.getpid()))
def wait_for_file(name):
    while not (OUT / name).exists():
        time.sleep(0.02)
"""


class Launch:
    """One `spotrun launch` run in its own session, so the test can signal its process group."""

    def __init__(self, tmp_path: Path) -> None:
        self.out = tmp_path
        self.processes: list[subprocess.Popen[str]] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            contract.JOB: "launcher-test",
            contract.NAMESPACE: "test",
            contract.STORAGE: str(self.out / "storage"),
            contract.MASTER_PORT: str(free_port()),
            "PYTHONPATH": os.pathsep.join([os.environ["PYTHONPATH"], str(self.out)]),
            "TEST_OUT": str(self.out),
        }
        env.pop(contract.NPROC_PER_NODE, None)
        env.update(extra)
        return env

    def start(
        self, *args: str, script: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "spotrun.cli", "launch", *args]
        if script is not None:
            path = self.out / "worker.py"
            path.write_text(PRELUDE + textwrap.dedent(script))
            command += ["--", sys.executable, str(path)]
        process = subprocess.Popen(
            command,
            env=env if env is not None else self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def finish(self, process: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, err = process.communicate()
            raise AssertionError(f"launcher did not exit in {timeout}s:\n{err}") from None
        return process.returncode, err

    def pids(self, count: int) -> list[int]:
        wait_until(
            lambda: all((self.out / f"pid-{r}").exists() for r in range(count)), "workers to start"
        )
        return [int((self.out / f"pid-{r}").read_text()) for r in range(count)]

    def cleanup(self) -> None:
        # The whole process group: workers too, should a failing test have orphaned them.
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    runner = Launch(tmp_path)
    yield runner
    runner.cleanup()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def is_gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (it runs no code either way)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def test_each_worker_gets_its_rank_in_the_group_and_the_rest_of_the_environment(
    launch: Launch,
) -> None:
    env = launch.env(
        **{
            contract.REPLICAS: "2",
            contract.NODE_RANK: "1",
            contract.NPROC_PER_NODE: "4",  # the flag overrides it
            contract.MASTER_ADDR: "trainer-0.trainer.test.svc",
            "USER_SETTING": "kept",
        }
    )
    process = launch.start(
        "--nproc-per-node",
        "2",
        script="""
        names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "SPOTRUN_NPROC_PER_NODE", "SPOTRUN_JOB",
                 "USER_SETTING", "OMP_NUM_THREADS"]
        seen = {n: os.environ.get(n) for n in names}
        (OUT / f"env-{LOCAL_RANK}.json").write_text(json.dumps(seen))
        """,
        env=env,
    )
    code, err = launch.finish(process)
    assert code == 0, err
    seen = [read_json(launch.out / f"env-{r}.json") for r in range(2)]
    port = env[contract.MASTER_PORT]
    for local_rank, worker in enumerate(seen):
        assert worker == {
            "RANK": str(2 + local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "1",
            "MASTER_ADDR": "trainer-0.trainer.test.svc",
            "MASTER_PORT": port,
            "SPOTRUN_NPROC_PER_NODE": "2",
            "SPOTRUN_JOB": "launcher-test",
            "USER_SETTING": "kept",
            "OMP_NUM_THREADS": "1",
        }
    assert "[spotrun launch] job test/launcher-test attempt 0: node 1 of 2" in err
    assert "world size 4, ranks 2-3" in err
    assert "worker 1 (rank 3) exited with code 0" in err


def test_nproc_per_node_defaults_to_the_pod_contract(launch: Launch) -> None:
    process = launch.start(
        script='(OUT / f"rank-{os.environ[\'RANK\']}").write_text("")',
        env=launch.env(**{contract.NPROC_PER_NODE: "3"}),
    )
    code, err = launch.finish(process)
    assert code == 0, err
    assert sorted(p.name for p in launch.out.glob("rank-*")) == ["rank-0", "rank-1", "rank-2"]


def test_a_failing_worker_fails_the_launcher_with_its_code_and_stops_the_others(
    launch: Launch,
) -> None:
    process = launch.start(
        "--nproc-per-node",
        "2",
        "--grace-seconds",
        "30",
        script="""
        if LOCAL_RANK == 1:
            wait_for_file("pid-0")
            sys.exit(3)
        time.sleep(120)
        """,
    )
    pids = launch.pids(2)
    started = time.monotonic()
    code, err = launch.finish(process)
    assert code == 3, err
    # The survivor was stopped by the launcher's SIGTERM, well before the 30 s grace.
    assert time.monotonic() - started < 15
    assert "worker 1 (rank 1) exited with code 3" in err
    assert "worker 0 (rank 0) killed by SIGTERM" in err
    assert all(is_gone(pid) for pid in pids)


def test_a_worker_killed_by_a_signal_fails_the_launcher_with_128_plus_the_signal(
    launch: Launch,
) -> None:
    process = launch.start(
        "--nproc-per-node",
        "2",
        script="""
        if LOCAL_RANK == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
        """,
    )
    code, err = launch.finish(process)
    assert code == 128 + signal.SIGKILL, err


def test_a_sigkilled_launcher_leaves_no_orphan_workers(launch: Launch) -> None:
    process = launch.start("--nproc-per-node", "2", script="time.sleep(120)")
    pids = launch.pids(2)
    assert not any(is_gone(pid) for pid in pids)
    process.kill()
    process.wait()
    wait_until(lambda: all(is_gone(pid) for pid in pids), "workers to die with their launcher", 10)


SIGTERM_TO_PREEMPTED = """
def on_sigterm(signum, frame):
    (OUT / f"sigterm-{LOCAL_RANK}").write_text(str(signum))
    sys.exit(75)
signal.signal(signal.SIGTERM, on_sigterm)
time.sleep(120)
"""


def test_sigterm_is_forwarded_to_every_worker_and_their_preempted_exit_is_the_launchers(
    launch: Launch,
) -> None:
    process = launch.start("--nproc-per-node", "2", script=SIGTERM_TO_PREEMPTED)
    launch.pids(2)
    process.send_signal(signal.SIGTERM)
    code, err = launch.finish(process)
    assert code == EXIT_PREEMPTED, err
    for rank in range(2):
        assert (launch.out / f"sigterm-{rank}").read_text() == str(int(signal.SIGTERM))
    assert "received SIGTERM: forwarding SIGTERM to 2 worker(s) (ranks 0, 1)" in err


def test_ctrl_c_reaches_the_workers_only_as_a_forwarded_sigterm(launch: Launch) -> None:
    process = launch.start("--nproc-per-node", "2", script=SIGTERM_TO_PREEMPTED)
    launch.pids(2)
    # A terminal sends SIGINT to the whole foreground process group, workers included.
    os.killpg(process.pid, signal.SIGINT)
    code, err = launch.finish(process)
    assert code == EXIT_PREEMPTED, err
    assert "received SIGINT: forwarding SIGTERM" in err
    assert all((launch.out / f"sigterm-{rank}").exists() for rank in range(2))


def test_workers_still_running_at_the_deadline_are_killed(launch: Launch) -> None:
    process = launch.start(
        "--nproc-per-node",
        "2",
        "--grace-seconds",
        "1",
        script="""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(120)
        """,
    )
    pids = launch.pids(2)
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code, err = launch.finish(process)
    elapsed = time.monotonic() - started
    assert code == 128 + signal.SIGTERM, err
    assert 1 <= elapsed < 10
    assert "deadline passed: killing 2 worker(s) (ranks 0, 1) with SIGKILL" in err
    assert all(is_gone(pid) for pid in pids)


def test_a_second_signal_kills_the_workers_without_waiting_for_the_deadline(
    launch: Launch,
) -> None:
    process = launch.start(
        "--nproc-per-node",
        "2",
        "--grace-seconds",
        "30",
        script="""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(120)
        """,
    )
    pids = launch.pids(2)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    code, err = launch.finish(process, timeout=10)
    assert code == 128 + signal.SIGTERM, err
    assert "received SIGINT again: killing the workers now" in err
    assert all(is_gone(pid) for pid in pids)


def test_the_grace_period_comes_from_the_environment_without_the_flag(launch: Launch) -> None:
    process = launch.start(
        "--nproc-per-node",
        "1",
        script="""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(120)
        """,
        env=launch.env(SPOTRUN_GRACE_SECONDS="0.5"),
    )
    launch.pids(1)
    process.send_signal(signal.SIGTERM)
    code, err = launch.finish(process, timeout=10)
    assert code == 128 + signal.SIGTERM, err
    assert "SIGKILL in 0.5s" in err


def test_workers_ending_with_done_and_an_agreed_notice_make_a_preempted_launcher(
    launch: Launch,
) -> None:
    # Rank 1 exits as a session does when its group agreed on a notice another node got.
    script = """
    from spotrun import contract
    if LOCAL_RANK:
        contract.announce_preempted_exit(LOCAL_RANK)
        sys.exit(75)
    """
    process = launch.start("--nproc-per-node", "2", script=script)
    code, err = launch.finish(process)
    assert code == EXIT_PREEMPTED, err


def test_a_worker_exiting_75_without_a_notice_fails_the_launcher(launch: Launch) -> None:
    process = launch.start("--nproc-per-node", "2", script="sys.exit(75 if LOCAL_RANK else 0)")
    code, err = launch.finish(process)
    assert code not in (0, EXIT_PREEMPTED), err
    assert code == 1, err
    assert "worker 1 (rank 1) exited with code 75 without a preemption notice" in err


def test_a_command_that_does_not_exist_fails_with_127(launch: Launch) -> None:
    process = launch.start("--", "/nonexistent/spotrun-test-binary")
    code, err = launch.finish(process)
    assert code == 127
    assert "cannot start worker 0" in err


def test_nothing_to_launch_is_refused_with_what_to_give(launch: Launch) -> None:
    process = launch.start()
    code, err = launch.finish(process)
    assert code == 2
    assert "nothing to launch" in err and "--function module:fn" in err


FUNCTION_MODULE = """
import json, os
from pathlib import Path

def record(config):
    import spotrun
    ctx = spotrun.get_context()
    out = Path(os.environ["TEST_OUT"]) / f"called-{ctx.world_rank}.json"
    out.write_text(json.dumps({"config": config, "rank": ctx.world_rank, "size": ctx.world_size}))
"""


def test_function_mode_calls_fn_with_the_job_config_on_every_rank(launch: Launch) -> None:
    (launch.out / "user_functions.py").write_text(FUNCTION_MODULE)
    config = {"lr": 0.1, "layers": [1, 2]}
    env = launch.env(**{contract.CONFIG: json.dumps(config)})
    process = launch.start("--nproc-per-node", "2", "--function", "user_functions:record", env=env)
    code, err = launch.finish(process, timeout=50)
    assert code == 0, err
    for rank in range(2):
        assert read_json(launch.out / f"called-{rank}.json") == {
            "config": config,
            "rank": rank,
            "size": 2,
        }


def test_function_mode_reads_the_function_from_the_pod_contract(launch: Launch) -> None:
    (launch.out / "user_functions.py").write_text(FUNCTION_MODULE)
    env = launch.env(**{contract.FUNCTION: "user_functions:record"})
    process = launch.start("--nproc-per-node", "1", env=env)
    code, err = launch.finish(process, timeout=50)
    assert code == 0, err
    assert read_json(launch.out / "called-0.json")["config"] == {}


def test_function_mode_names_a_missing_function(launch: Launch) -> None:
    (launch.out / "user_functions.py").write_text(FUNCTION_MODULE)
    process = launch.start("--function", "user_functions:nope")
    code, err = launch.finish(process, timeout=50)
    assert code == 1
    assert "'user_functions' has no attribute 'nope'" in err
