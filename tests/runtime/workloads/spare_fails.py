"""The demo's training function, in a module that cannot be imported by a warm spare.

Only a spare's workers (SPOTRUN_SPARE set) fail, at import, before they wait: the group
trains as usual while the supervisor starts spares that keep failing.
"""

from __future__ import annotations

import os

from examples.train_linear import train_func_steps

if os.environ.get("SPOTRUN_SPARE"):
    raise ImportError("spare_fails: this module refuses to load in a spare")

__all__ = ["train_func_steps"]
