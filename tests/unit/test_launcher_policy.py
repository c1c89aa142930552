"""The launcher's pure parts: each worker's environment, the exit code, the command line."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from spotrun import contract
from spotrun.cli import build_parser
from spotrun.contract import EXIT_PREEMPTED, PodContract
from spotrun.pod.launcher import (
    FUNCTION_WORKER_MODULE,
    LaunchError,
    WorkerExit,
    describe_exit,
    exit_code,
    launch,
    worker_command,
    worker_env,
)

TERM, KILL, INT = int(signal.SIGTERM), int(signal.SIGKILL), int(signal.SIGINT)


def done(rank: int, code: int, *sent: int) -> WorkerExit:
    return WorkerExit(local_rank=rank, returncode=code, signals_sent=frozenset(sent))


def honoured(rank: int) -> WorkerExit:
    """A worker whose session honoured a notice the group agreed on (another node got it)."""
    return WorkerExit(local_rank=rank, returncode=EXIT_PREEMPTED, notice_honoured=True)


@pytest.mark.parametrize(
    ("exits", "received", "expected"),
    [
        pytest.param([done(0, 0), done(1, 0)], None, 0, id="all done"),
        pytest.param(
            [done(0, 75, TERM), done(1, 75, TERM)], TERM, EXIT_PREEMPTED, id="all preempted"
        ),
        pytest.param(
            [done(0, 0), done(1, 75, TERM)], TERM, EXIT_PREEMPTED, id="done and preempted"
        ),
        pytest.param([done(1, 3), done(0, -TERM, TERM)], None, 3, id="failure, other stopped"),
        pytest.param([done(1, 3), done(0, 1, TERM)], None, 3, id="first failure wins"),
        pytest.param([done(0, -KILL), done(1, -TERM, TERM)], None, 128 + KILL, id="oom killed"),
        pytest.param([done(0, -TERM)], None, 128 + TERM, id="sigterm nobody sent"),
        pytest.param(
            [done(0, 75, TERM), done(1, -KILL, TERM, KILL)], TERM, 128 + TERM, id="deadline passed"
        ),
        pytest.param([done(0, -TERM, TERM)], INT, 128 + INT, id="ctrl-c, no handler"),
        pytest.param(
            [done(0, 75, TERM), done(1, 2, TERM)], TERM, 2, id="failure during the final save"
        ),
        pytest.param(
            [honoured(0), honoured(1)], None, EXIT_PREEMPTED, id="notice agreed with another node"
        ),
        pytest.param([done(0, 0), honoured(1)], None, EXIT_PREEMPTED, id="done and agreed"),
        pytest.param([done(0, 75)], None, 1, id="75 without a notice is a failure"),
        pytest.param([done(0, 0), done(1, 75)], None, 1, id="75 without a notice beside a 0"),
        pytest.param([done(0, 75), done(1, 75, TERM)], TERM, 1, id="75 before the notice came"),
    ],
)
def test_the_launcher_exit_code_folds_its_workers_fate(
    exits: list[WorkerExit], received: int | None, expected: int
) -> None:
    assert exit_code(exits, received) == expected


def test_a_worker_exiting_75_without_a_notice_is_a_failure_and_says_so() -> None:
    worker = done(0, EXIT_PREEMPTED)
    assert worker.failed and not worker.preempted
    assert worker.code == EXIT_PREEMPTED  # what it did; the launcher's code says what it means
    assert exit_code([worker]) != EXIT_PREEMPTED
    assert "without a preemption notice" in describe_exit(worker)


def test_worker_ranks_follow_node_rank_and_local_rank() -> None:
    pod = PodContract(job="j", replicas=3, node_rank=2, nproc_per_node=8, master_port=1234)
    env = worker_env({"PATH": "/bin", "OMP_NUM_THREADS": "4"}, pod, local_rank=1, nproc_per_node=2)
    assert env == {
        "PATH": "/bin",
        "OMP_NUM_THREADS": "4",  # a user's choice is kept
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "6",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "2",
        "GROUP_WORLD_SIZE": "3",
        contract.NPROC_PER_NODE: "2",
        contract.NODE_RANK: "2",
        contract.MASTER_ADDR: "127.0.0.1",
        contract.MASTER_PORT: "1234",
    }


def test_one_worker_keeps_its_openmp_threads() -> None:
    pod = PodContract(job="j")
    assert "OMP_NUM_THREADS" not in worker_env({}, pod, local_rank=0, nproc_per_node=1)
    assert worker_env({}, pod, local_rank=0, nproc_per_node=2)["OMP_NUM_THREADS"] == "1"


def test_worker_command_is_the_command_or_the_function_worker() -> None:
    assert worker_command(["python", "train.py"], None) == ["python", "train.py"]
    assert worker_command([], "pkg.mod:fn") == [
        sys.executable,
        "-m",
        FUNCTION_WORKER_MODULE,
        "pkg.mod:fn",
    ]
    with pytest.raises(LaunchError, match="not both"):
        worker_command(["python", "train.py"], "pkg.mod:fn")
    with pytest.raises(LaunchError, match="module:function"):
        worker_command([], "train_func")
    with pytest.raises(LaunchError, match="nothing to launch"):
        worker_command([], None)


def test_the_launch_command_line_keeps_the_worker_arguments_verbatim() -> None:
    args = build_parser().parse_args(
        ["launch", "--nproc-per-node", "2", "--", "python", "train.py", "--nproc-per-node", "9"]
    )
    assert args.nproc_per_node == 2
    assert args.command[args.command.index("python") :] == [
        "python",
        "train.py",
        "--nproc-per-node",
        "9",
    ]
    args = build_parser().parse_args(["launch", "--function", "examples.train_linear:train_func"])
    assert args.function == "examples.train_linear:train_func"
    assert args.command == []


def test_launch_imports_neither_the_trainjob_validator_nor_the_terminal_ui() -> None:
    """The pod's main process starts workers sooner, and needs no jsonschema or rich."""
    probe = (
        "import sys; from spotrun.cli import build_parser; "
        "build_parser(only='launch').parse_args(['launch', '--', 'true']); "
        "print(sorted(m for m in ('spotrun.local.trainjob', 'jsonschema', 'rich', 'spotrun.local.supervisor') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({contract.SPARE: "x", contract.RECOVERY: "warm"}, "SPOTRUN_SPARE must be a spare slot"),
        ({contract.SPARE: "-1", contract.RECOVERY: "warm"}, "SPOTRUN_SPARE must be >= 0"),
        ({contract.SPARE: "0", contract.RECOVERY: "cold"}, "is not warm"),
        ({"SPOTRUN_GRACE_SECONDS": "soon"}, "must be a number of seconds"),
        ({"SPOTRUN_GRACE_SECONDS": "-2"}, "must be >= 0, got -2"),
    ],
)
def test_a_launcher_with_a_bad_spare_or_grace_starts_nothing(
    extra: dict[str, str], message: str
) -> None:
    with pytest.raises(LaunchError, match=message):
        launch(["true"], env={contract.JOB: "job", **extra})
