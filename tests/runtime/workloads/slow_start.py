"""A training function whose start-up, or whose training, goes silent for as long as asked.

config: steps, step_seconds, startup_seconds (asleep before the first report), and
hang_at_step (from that step on it reports nothing, for an hour).
"""

from __future__ import annotations

import time
from typing import Any

import spotrun


def train_func(config: dict[str, Any]) -> None:
    time.sleep(float(config.get("startup_seconds", 0)))
    hang_at = config.get("hang_at_step")
    for step in range(int(config["steps"])):
        if hang_at is not None and step >= int(hang_at):
            print(f"slow_start: silent from step {step} on", flush=True)
            time.sleep(3600)
        time.sleep(float(config.get("step_seconds", 0.05)))
        spotrun.report({"step": step, "loss": 1.0 / (step + 1)})
