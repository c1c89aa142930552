"""A warm worker's next checkpoint writer is started ahead, so a regroup does not wait for it.

A writer process imports torch (seconds) before it serves; the next session of a survivor
or a promoted spare takes the writer started ahead instead of starting one (issue #13).
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path

import pytest

from spotrun.ledger.sink import read_status_file, status_file, update_status_file
from spotrun.train import writer
from spotrun.train.writer import WriterClient
from tests.runtime.helpers import writer_config


def started_ahead(timeout: float = 10.0) -> subprocess.Popen[bytes]:
    deadline = time.monotonic() + timeout
    while writer._standby is None:
        assert time.monotonic() < deadline, "no writer was started ahead"
        time.sleep(0.01)
    return writer._standby[0]


def test_the_next_writer_of_a_warm_worker_was_started_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "STANDBY_DELAY_SECONDS", 0.0)
    config = writer_config(tmp_path, world_size=2)
    root = config.root
    first = WriterClient(config, standby=True)
    try:
        # Started by the first submit once the delay has passed (here: at once).
        first.wait(first.submit("progress", metrics={"loss": 1.0}, step=1, time=time.time()))
        ahead = started_ahead()
    finally:
        first.close()
    assert ahead.poll() is None  # the first writer's close leaves the one started ahead
    update_status_file(status_file(root), lambda status: status.update(attempt=2))  # regroup

    second = WriterClient(dataclasses.replace(config, attempt=2))
    try:
        assert second._proc is ahead
        assert writer._standby is None  # not warm: nothing started ahead of this one
        second.wait(second.submit("progress", metrics={"loss": 0.5}, step=2, time=time.time()))
    finally:
        second.close()
    assert ahead.poll() is not None
    assert read_status_file(status_file(root))["lastMetrics"]["step"] == 2


def test_a_writer_started_ahead_that_died_is_replaced(tmp_path: Path) -> None:
    writer.prepare_standby()
    assert writer._standby is not None
    dead = writer._standby[0]
    dead.kill()
    dead.wait()
    client = WriterClient(writer_config(tmp_path, world_size=2))
    try:
        assert client._proc is not dead and client._proc is not None
        client.wait(client.submit("progress", metrics={"loss": 1.0}, step=1, time=time.time()))
    finally:
        client.close()
