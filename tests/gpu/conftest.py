"""The gpu tier runs where a CUDA GPU is present (a GPU machine); everywhere else it skips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run the gpu tier on a GPU machine)")
    for item in items:
        if "gpu" in Path(str(item.fspath)).parts:
            item.add_marker(skip)
