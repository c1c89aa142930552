"""Local mode's pure parts around the status: field ownership, commands, tables, summaries."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotrun.ledger.status import RUNTIME_FIELDS
from spotrun.lifecycle import OWNED_FIELDS, format_time
from spotrun.local.progress import Snapshot, costs, progress_line, summary_lines
from spotrun.local.status_command import COLUMNS, WIDE_COLUMNS, human_duration, row, table
from spotrun.local.supervisor import (
    LocalRunError,
    Options,
    check_capacity,
    check_storage,
    launcher_argv,
    merge_owned,
    mtbf_seconds,
    owned,
    storage_url,
)
from spotrun.local.trainjob import TrainJob, trainjob_from_dict

T0 = 1_700_000_000.0
ROOT = Path(__file__).resolve().parents[2]


def job(**trainer: Any) -> TrainJob:
    trainer.setdefault("image", "spotrun-runtime:dev")
    if "command" not in trainer:
        trainer.setdefault("function", "examples.train_linear:train_func_steps")
    return trainjob_from_dict(
        {
            "apiVersion": "spotrun.dev/v1alpha1",
            "kind": "TrainJob",
            "metadata": {"name": "demo"},
            "spec": {"replicas": 2, "nprocPerNode": 2, "trainer": trainer},
        }
    )


# -- status ownership --------------------------------------------------------------------


def test_merging_the_plan_never_touches_the_runtime_fields() -> None:
    current = {
        "attempt": 1,
        "state": "Running",
        "latestCheckpoint": {"uri": "/runs/ckpt-000004", "step": 40},
        "lastMetrics": {"step": 41},
        "restartNotBefore": format_time(T0),
    }
    # A plan computed from an older read: it has no checkpoint, and no backoff any more.
    decided = {"attempt": 2, "state": "Restarting", "latestCheckpoint": None}
    merge_owned(current, decided)
    assert current["attempt"] == 2 and current["state"] == "Restarting"
    assert current["latestCheckpoint"] == {"uri": "/runs/ckpt-000004", "step": 40}
    assert current["lastMetrics"] == {"step": 41}
    assert "restartNotBefore" not in current


def test_the_policy_and_the_runtime_own_disjoint_fields() -> None:
    assert not set(OWNED_FIELDS) & set(RUNTIME_FIELDS)
    assert owned({"state": "Running", "lastMetrics": {}}) == {"state": "Running"}


# -- storage and commands ------------------------------------------------------------------


def test_storage_defaults_to_spotrun_runs_made_absolute() -> None:
    assert storage_url(None, None) == os.path.abspath("spotrun-runs")
    assert storage_url("runs", "gs://bucket/x") == os.path.abspath("runs")
    assert storage_url(None, "gs://bucket/x/") == "gs://bucket/x"
    assert storage_url("file:///tmp/runs", None) == "file:///tmp/runs"


@pytest.mark.parametrize(
    ("replicas", "nproc", "cores", "refused"),
    [
        pytest.param(2, 1, 2, False, id="the example on 2 cores"),
        pytest.param(2, 4, 2, False, id="4 workers per core"),
        pytest.param(3, 3, 2, True, id="more than 4 per core"),
        pytest.param(10000, 1024, 64, True, id="a cluster's job"),
        pytest.param(1, 4, 0, False, id="no core count: one core assumed"),
    ],
)
def test_local_runs_are_bounded_by_the_machines_cores(
    replicas: int, nproc: int, cores: int, refused: bool
) -> None:
    if not refused:
        check_capacity(replicas, nproc, cores)
        return
    with pytest.raises(LocalRunError) as caught:
        check_capacity(replicas, nproc, cores)
    message = str(caught.value)
    assert f"replicas x nprocPerNode = {replicas} x {nproc} = {replicas * nproc} workers" in message
    assert f"it has {cores} CPU core(s)" in message and "lower spec.replicas" in message


@pytest.mark.parametrize(
    ("flag", "spec", "where"),
    [
        ("memory://ckpt", None, "--storage memory://ckpt"),
        (None, "memory://bucket/prefix", "spec.checkpoint.storage memory://bucket/prefix"),
        ("MEMORY://x", "file:///tmp/x", "--storage MEMORY://x"),
    ],
)
def test_storage_inside_one_process_is_refused(
    flag: str | None, spec: str | None, where: str
) -> None:
    with pytest.raises(LocalRunError) as caught:
        check_storage(flag, spec)
    assert str(caught.value).startswith(where) and "no checkpoint" in str(caught.value)


@pytest.mark.parametrize(
    ("flag", "spec"),
    [(None, None), ("./runs", None), ("gs://bucket/p", None), ("file:///tmp/r", "memory://x")],
)
def test_storage_other_processes_see_is_accepted(flag: str | None, spec: str | None) -> None:
    check_storage(flag, spec)


def test_a_function_trainer_runs_through_the_launcher() -> None:
    argv = launcher_argv(job(), inject_failure=False)
    assert argv == [
        sys.executable,
        "-m",
        "spotrun.cli",
        "launch",
        "--nproc-per-node",
        "2",
        "--function",
        "examples.train_linear:train_func_steps",
    ]


def test_a_command_trainer_keeps_its_arguments() -> None:
    argv = launcher_argv(
        job(command=["python", "train.py"], args=["--lr", "0.1"]), inject_failure=False
    )
    assert argv[-5:] == ["--", "python", "train.py", "--lr", "0.1"]


def test_an_injected_failure_wraps_the_worker_not_the_launcher() -> None:
    argv = launcher_argv(job(), inject_failure=True)
    assert argv[argv.index("--") :] == [
        "--",
        sys.executable,
        "-m",
        "spotrun.local._fault_worker",
        "examples.train_linear:train_func_steps",
    ]
    argv = launcher_argv(job(command=["python3", "-m", "pkg.train"]), inject_failure=True)
    assert argv[-4:] == ["spotrun.local._fault_worker", "--", "-m", "pkg.train"]


@pytest.mark.parametrize("command", [["bash", "run.sh"], ["python", "-u", "train.py"], ["python"]])
def test_an_injected_failure_refuses_commands_it_cannot_wrap(command: list[str]) -> None:
    with pytest.raises(LocalRunError, match="--fail-rank"):
        launcher_argv(job(command=command), inject_failure=True)


def test_the_checkpoint_cadence_hears_of_the_injected_fault_rate() -> None:
    assert mtbf_seconds(Options()) is None
    assert mtbf_seconds(Options(preempt_every=20.0)) == 20.0
    assert mtbf_seconds(Options(preempt_every=20.0, kill_every=20.0)) == pytest.approx(10.0)


# -- kubectl's table -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "<invalid>"),
        (-0.5, "0s"),
        (45, "45s"),
        (119, "119s"),
        (120, "2m"),
        (312, "5m12s"),
        (600, "10m"),
        (3 * 3600 + 4 * 60, "3h4m"),
        (10 * 3600, "10h"),
        (2 * 86400 + 5 * 3600, "2d5h"),
        (30 * 86400, "30d"),
        (3 * 365 * 86400 + 86400, "3y1d"),
        (9 * 365 * 86400, "9y"),
    ],
)
def test_ages_read_as_kubectl_prints_them(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_a_row_holds_the_printer_columns_with_none_for_missing_values() -> None:
    obj = {
        "metadata": {"name": "demo", "creationTimestamp": format_time(T0 - 400)},
        "spec": {"replicas": 3},
        "status": {
            "state": "Running",
            "readyReplicas": 2,
            "preemptions": 3,
            "failures": 0,
            "attempt": 4,
            "size": "2/3",
            "spares": "0/1",
            "latestCheckpoint": {"step": 120, "time": format_time(T0 - 7)},
            "inMemory": {"step": 131, "bucket": False, "time": format_time(T0 - 1)},
        },
    }
    assert row(obj, T0) == ["demo", "Running", "2", "2/3", "3", "0", "120", "7s", "6m40s"]
    wide = row(obj, T0, wide=True)
    assert (wide[4], wide[5], wide[9]) == ("4", "0/1", "131")
    assert len(wide) == len(WIDE_COLUMNS)
    assert row({"metadata": {"name": "new"}}, T0)[1:] == ["<none>"] * 8


def test_columns_are_padded_like_kubectl() -> None:
    text = table([["demo", "Running"]], ("NAME", "STATE"))
    assert text.splitlines() == ["NAME   STATE", "demo   Running"]


def test_columns_are_the_crds_printer_columns() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "trainjobs.spotrun.dev.yaml").read_text())
    printed = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    default = [c["name"].upper() for c in printed if not c.get("priority")]
    wide = [c["name"].upper() for c in printed if c.get("priority")]
    assert list(COLUMNS) == ["NAME", *default]
    assert list(WIDE_COLUMNS) == ["NAME", *[c["name"].upper() for c in printed]]
    assert wide == ["ATTEMPT", "SPARES", "MEMORY-STEP"]


# -- progress and summary --------------------------------------------------------------------


def interrupted_status() -> dict[str, Any]:
    return {
        "state": "Succeeded",
        "attempt": 3,
        "preemptions": 2,
        "failures": 0,
        "lastMetrics": {"step": 99, "loss": 0.125, "time": format_time(T0)},
        "latestCheckpoint": {"uri": "/r/ckpt-000009", "step": 99, "time": format_time(T0)},
        "checkpoints": [{"uri": "/r/ckpt-000009", "step": 99}],
        "interruptions": [
            {
                "time": format_time(T0 - 60),
                "attempt": 1,
                "kind": "preemption",
                "reason": "InjectedPreemption",
                "step": 30,
                "stepsLost": 0,
                "secondsToRecover": 2.5,
            },
            {
                "time": format_time(T0 - 30),
                "attempt": 2,
                "kind": "preemption",
                "reason": "InjectedKill",
                "step": 61,
                "stepsLost": 11,
                "secondsToRecover": 3.0,
            },
        ],
    }


def test_each_interruption_costs_the_time_until_the_next_attempt_trains() -> None:
    paid = costs(interrupted_status(), {2: T0 - 52, 3: T0 - 20})
    assert [c.steps_lost for c in paid] == [0, 11]
    assert [c.seconds_without_training for c in paid] == [pytest.approx(8.0), pytest.approx(10.0)]


def test_the_summary_totals_the_work_lost() -> None:
    head, ledger, closing = summary_lines(
        interrupted_status(),
        job="demo",
        namespace="default",
        elapsed=75.0,
        total_steps=100,
        training_started={2: T0 - 52, 3: T0 - 20},
        status_path="/r/status.json",
    )
    rows = dict(head + closing)
    assert rows["steps"].startswith("100 of 100")
    assert rows["work lost"] == "11 steps redone (11.0% of 100); 18.0s without training"
    assert rows["interruptions"] == "2 preemptions (no failure budget spent), 0 failures"
    assert [line[3] for line in ledger] == ["InjectedPreemption", "InjectedKill"]
    assert ledger[1][5:] == ["11", "3.0s", "10.0s"]


def test_the_progress_line_shows_step_loss_checkpoint_and_counts() -> None:
    snapshot = Snapshot(
        job="demo",
        namespace="default",
        status={**interrupted_status(), "state": "Running"},
        now=T0 + 4,
        started=T0 - 80,
        replicas=2,
        total_steps=100,
    )
    assert progress_line(snapshot) == (
        "attempt 3 Running: step 100/100, loss 0.125; checkpoint step 99 "
        "(ckpt-000009, 4s ago), 1 kept; 2 preemptions, 0 failures"
    )
