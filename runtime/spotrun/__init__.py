"""spotrun: keep distributed PyTorch training running on preemptible (spot) GPU nodes.

The training API follows Ray Train's: `report(metrics, checkpoint=...)`, `get_checkpoint()`,
`Checkpoint.from_dict`, `get_context()`, `prepare_model`, `prepare_data_loader`.
Importing spotrun is light: torch is loaded only when the training API is first used, so
the operator can import spotrun's pure modules (contract, lifecycle, ledger.status) without it.

The package's rooms, top to bottom (import-linter keeps the order, see pyproject.toml):
`local` (spotrun run), `pod` (the pod's supervisor) and `train` (the training API in every
worker), `ledger` (the status record), `store` (the checkpoint format and its bytes), and at
the bottom `lifecycle` (the pure restart policy) and `contract` (the pod environment).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from spotrun.train.checkpoint import Checkpoint
    from spotrun.train.data import prepare_data_loader
    from spotrun.train.ddp import prepare_model
    from spotrun.train.group import get_device
    from spotrun.train.session import (
        TrainContext,
        get_checkpoint,
        get_context,
        report,
        should_checkpoint,
    )

__all__ = [
    "Checkpoint",
    "TrainContext",
    "get_checkpoint",
    "get_context",
    "get_device",
    "prepare_data_loader",
    "prepare_model",
    "report",
    "should_checkpoint",
]

_LAZY = {
    "Checkpoint": "spotrun.train.checkpoint",
    "TrainContext": "spotrun.train.session",
    "get_checkpoint": "spotrun.train.session",
    "get_context": "spotrun.train.session",
    "report": "spotrun.train.session",
    "should_checkpoint": "spotrun.train.session",
    "prepare_model": "spotrun.train.ddp",
    "get_device": "spotrun.train.group",
    "prepare_data_loader": "spotrun.train.data",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spotrun' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
