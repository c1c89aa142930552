"""prepare_model and init_process_group without a group: what a single process gets."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
from torch import nn
from torch.distributed import TCPStore  # type: ignore[attr-defined]  # exported at run time

from spotrun.local.ports import free_port
from spotrun.train.ddp import prepare_model
from spotrun.train.group import (
    ProcessGroupError,
    get_device,
    init_process_group,
    wait_for_listener,
)


def test_one_worker_gets_its_model_back_unwrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = nn.Linear(4, 1)
    prepared = prepare_model(model)
    assert prepared is model
    assert list(prepared.state_dict()) == ["weight", "bias"]


def test_without_a_gpu_the_device_is_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_device() == torch.device("cpu")


def test_joining_a_group_without_the_launcher_environment_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ProcessGroupError, match="MASTER_PORT, RANK, WORLD_SIZE not set"):
        init_process_group()


def test_a_member_ahead_of_rank_0_joins_its_store_once_it_listens() -> None:
    """A spare promoted at once reaches the rendezvous before rank 0's store is up."""
    port = free_port()
    stores: list[TCPStore] = []

    def rank_0() -> None:
        time.sleep(0.3)
        stores.append(TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=30)))

    server = threading.Thread(target=rank_0)
    server.start()
    try:
        assert wait_for_listener("127.0.0.1", port, give_up=lambda: False)
        client = TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=30))
        client.set("joined", "rank 1")
    finally:
        server.join()
    # The probe's bare connection did not disturb the store: rank 0 sees rank 1's key.
    assert stores[0].get("joined") == b"rank 1"


def test_waiting_for_a_listener_stops_when_told_to() -> None:
    port = free_port()  # nothing listens there
    asked: list[int] = []

    def give_up() -> bool:
        asked.append(1)
        return len(asked) > 3

    assert wait_for_listener("127.0.0.1", port, give_up=give_up) is False
    assert len(asked) == 4
