"""A training function that exits 75, spotrun's preempted code, though no notice ever came."""

from __future__ import annotations

import sys
from typing import Any


def train_func(config: dict[str, Any]) -> None:
    print("exit_75: leaving with code 75 on its own", flush=True)
    sys.exit(75)
