"""Test tiers: every test gets the marker of the folder it lives in (unit, runtime, cluster, node,
gpu)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.cluster", "tests.fixtures.gcs"]

TIERS = ("unit", "runtime", "cluster", "node", "gpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
