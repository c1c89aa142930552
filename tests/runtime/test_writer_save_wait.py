"""A save waits for the rank's previous one; a survivor of a lost member stops waiting.

The snapshot buffer is reused, so WriterClient.save first waits for the upload in flight.
With a large state that is seconds, and a survivor waiting there learned of the loss only
after it (issue #13). With `give_up`, the wait ends as soon as it says so, and the buffer
keeps the previous snapshot. The writer process is paused (SIGSTOP) to hold an upload in
flight.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from spotrun.store.tree import flatten
from spotrun.train.checkpoint import Checkpoint
from spotrun.train.writer import SaveAbandoned, WriterClient
from tests.runtime.helpers import writer_config


def test_a_save_gives_up_waiting_for_the_previous_one_when_asked(tmp_path: Path) -> None:
    writer = WriterClient(writer_config(tmp_path))
    assert writer._proc is not None
    pid = writer._proc.pid
    first = {0: torch.arange(1000, dtype=torch.float32)}
    os.kill(pid, signal.SIGSTOP)  # the first save's upload cannot finish
    try:
        writer.save(0, "replicated", None, first)
        assert writer.snapshot is not None
        lost = threading.Event()
        threading.Timer(0.3, lost.set).start()
        started = time.monotonic()
        with pytest.raises(SaveAbandoned):
            writer.save(1, "replicated", None, {0: torch.zeros(1000)}, give_up=lost.is_set)
        assert time.monotonic() - started < 5  # 0.3 s and a poll, not the upload
        # Nothing of the second save was copied: the buffer holds the first snapshot.
        assert writer.snapshot is not None
        _, _, buffer = writer.snapshot
        held = torch.frombuffer(buffer, dtype=torch.float32, count=1000)
        assert torch.equal(held, first[0])
        # Without give_up the wait is for the upload itself (here: until the timeout).
        with pytest.raises(TimeoutError):
            writer.drain_save(timeout=0.3)
    finally:
        os.kill(pid, signal.SIGCONT)
        writer.close()


def test_a_save_that_is_not_asked_to_give_up_waits_for_the_previous_one(tmp_path: Path) -> None:
    writer = WriterClient(writer_config(tmp_path))
    try:
        writer.save(0, "replicated", None, {0: torch.ones(10)})
        # The previous save finishes: give_up is asked, says no, and the save goes ahead.
        writer.save(1, "replicated", None, {0: torch.full((10,), 2.0)}, give_up=lambda: False)
        writer.drain_save(timeout=60)
        assert writer.snapshot is not None
        _, _, buffer = writer.snapshot
        assert torch.equal(
            torch.frombuffer(buffer, dtype=torch.float32, count=10), torch.full((10,), 2.0)
        )
    finally:
        writer.close()


def test_a_snapshot_kept_in_memory_does_not_wait_for_the_upload_in_flight(
    tmp_path: Path,
) -> None:
    """The memory tier: `keep` copies into the buffer no upload reads, at once.

    The first save's upload is held (its writer paused); a snapshot kept in memory then
    goes into the second buffer, so it is the newest complete snapshot while the upload
    still reads the first one, untouched: the committed checkpoint is the first state.
    """
    writer = WriterClient(writer_config(tmp_path))
    assert writer._proc is not None
    pid = writer._proc.pid
    skeleton, tensors = flatten({"w": torch.arange(1000, dtype=torch.float32)})
    first = dict(enumerate(tensors))
    kept = {0: torch.full((1000,), 7.0)}
    os.kill(pid, signal.SIGSTOP)
    try:
        writer.save(0, "replicated", skeleton, first)
        assert writer.snapshot is not None
        _, _, uploading = writer.snapshot
        writer.keep(kept)  # returns although the upload cannot finish
        assert writer.snapshot is not None
        _, _, newest = writer.snapshot
        assert newest is not uploading
        assert torch.equal(torch.frombuffer(newest, dtype=torch.float32, count=1000), kept[0])
        assert torch.equal(torch.frombuffer(uploading, dtype=torch.float32, count=1000), first[0])
        # A second kept snapshot overwrites the newest in place, still not the upload's.
        writer.keep({0: torch.full((1000,), 8.0)})
        assert writer.snapshot is not None and writer.snapshot[2] is newest
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        writer.drain_save(timeout=60)
        job = writer.submit(
            "commit",
            seq=0,
            step=0,
            kind="replicated",
            writers=[0],
            metrics={},
            runtime={},
            time_=time.time(),
        )
        commit = writer.wait(job, timeout=60)
        assert torch.equal(Checkpoint.from_uri(commit["uri"]).to_dict()["w"], first[0])
        # Once the upload is done, the next save reuses the newest snapshot's buffer.
        writer.save(1, "replicated", None, {0: torch.zeros(1000)})
        assert writer.snapshot is not None and writer.snapshot[2] is newest
    finally:
        writer.close()
