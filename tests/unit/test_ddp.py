"""prepare_model and init_process_group without a group: what a single process gets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spotrun.train.ddp import prepare_model
from spotrun.train.group import ProcessGroupError, get_device, init_process_group


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
