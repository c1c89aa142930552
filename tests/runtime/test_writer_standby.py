"""A warm worker's next checkpoint writer is started ahead, so a regroup does not wait for it.

A writer process imports torch (seconds) before it serves; the next session of a survivor
or a promoted spare takes the writer started ahead instead of starting one (issue #13).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

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


def test_an_idle_writer_is_handed_on_to_the_next_session(tmp_path: Path) -> None:
    """A survivor's regroup reuses its writer process instead of importing torch again."""
    config = writer_config(tmp_path / "first", world_size=2)
    first = WriterClient(config)
    assert first._proc is not None
    proc = first._proc
    first.save(0, "replicated", None, {0: torch.arange(1000, dtype=torch.float32)})
    first.drain_save(timeout=60)
    first.wait(first.submit("progress", metrics={"loss": 1.0}, step=1, time=time.time()))
    assert first.recycle()
    assert first._proc is None
    first.close()  # a no-op now: the process is the next client's
    assert proc.poll() is None

    second_config = writer_config(tmp_path / "second", world_size=2)
    second = WriterClient(dataclasses.replace(second_config, attempt=2))
    try:
        assert second._proc is proc
        assert writer._recycled is None
        second.save(0, "replicated", None, {0: torch.full((500,), 3.0)})
        second.drain_save(timeout=60)
        second.wait(second.submit("progress", metrics={"loss": 0.5}, step=2, time=time.time()))
    finally:
        second.close()
    assert proc.poll() is not None
    # Each client's jobs went under its own configuration.
    assert read_status_file(status_file(config.root))["lastMetrics"]["step"] == 1
    assert read_status_file(status_file(second_config.root))["lastMetrics"]["step"] == 2


def test_a_writer_with_a_job_in_flight_is_not_handed_on(tmp_path: Path) -> None:
    client = WriterClient(writer_config(tmp_path, world_size=2))
    assert client._proc is not None
    pid = client._proc.pid
    client.wait(client.submit("progress", metrics={"loss": 2.0}, step=0, time=time.time()))
    assert client._serving
    os.kill(pid, signal.SIGSTOP)  # the next job cannot finish
    try:
        client.submit("progress", metrics={"loss": 1.0}, step=1, time=time.time(), detached=True)
        assert not client.recycle()
        assert writer._recycled is None
    finally:
        os.kill(pid, signal.SIGCONT)
        client.close(timeout=0)
    assert client._proc is None


def test_the_writer_started_ahead_stays_ahead_when_one_is_handed_on(tmp_path: Path) -> None:
    writer.prepare_standby()
    assert writer._standby is not None
    ahead = writer._standby[0]
    first = WriterClient(writer_config(tmp_path, world_size=2))
    try:
        assert first._proc is ahead  # the first client took the one started ahead
        assert not first.recycle()  # still importing: not waited for, not handed on
        first.wait(first.submit("progress", metrics={"loss": 1.0}, step=1, time=time.time()))
        writer.prepare_standby()
        assert writer._standby is not None
        second_ahead = writer._standby[0]
        reused = first._proc
        assert first.recycle()
        second = WriterClient(writer_config(tmp_path, world_size=2))
        try:
            assert second._proc is reused
            assert writer._standby is not None and writer._standby[0] is second_ahead
        finally:
            second.close()
    finally:
        first.close()
        taken = writer._take_standby()
        if taken is not None:
            writer._end(*taken)
