"""spotrun: keep distributed PyTorch training running on preemptible (spot) GPU nodes.

The training API follows Ray Train's: `report(metrics, checkpoint=...)`, `get_checkpoint()`,
`Checkpoint.from_dict`, `get_context()`, `prepare_model`, `prepare_data_loader`.
Importing spotrun is light: torch is loaded only when the training API is first used, so
the operator can import spotrun's pure modules (contract, lifecycle, status) without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from spotrun.checkpoint import Checkpoint
    from spotrun.data import prepare_data_loader
    from spotrun.ddp import prepare_model
    from spotrun.session import TrainContext, get_checkpoint, get_context, report, should_checkpoint

__all__ = [
    "Checkpoint",
    "TrainContext",
    "get_checkpoint",
    "get_context",
    "prepare_data_loader",
    "prepare_model",
    "report",
    "should_checkpoint",
]

_LAZY = {
    "Checkpoint": "spotrun.checkpoint",
    "TrainContext": "spotrun.session",
    "get_checkpoint": "spotrun.session",
    "get_context": "spotrun.session",
    "report": "spotrun.session",
    "should_checkpoint": "spotrun.session",
    "prepare_model": "spotrun.ddp",
    "prepare_data_loader": "spotrun.data",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spotrun' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
