"""Test tiers: every test gets the marker of the folder it lives in (unit, runtime, cluster, node,
gpu)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every process a test starts (spotrun run, spotrun launch, the operator, workers) runs the
# checkout under test, whatever spotrun the interpreter has installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "runtime"), str(ROOT / "operator"), str(ROOT)]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

pytest_plugins = ["tests.fixtures.cluster", "tests.fixtures.gcs"]

TIERS = ("unit", "runtime", "cluster", "node", "gpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
