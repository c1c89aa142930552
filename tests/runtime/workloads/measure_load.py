"""Peak RSS of one load of a committed checkpoint, in a fresh process (argv: uri, warm-up uri).

Prints `RESULT {"baseline_kb", "peak_kb", "state_bytes"}`: the resident set after importing
everything and loading the small warm-up checkpoint, and its peak (VmHWM) while loading
`uri` and touching every byte of its tensors (so memory-mapped tensors count as resident).
The peak is reset after the warm-up (/proc/self/clear_refs); ru_maxrss would not do, as a
child starts with its parent's at the fork.
"""

from __future__ import annotations

import json
import sys

import torch

from spotrun.train.checkpoint import Checkpoint


def touch(state: object) -> int:
    total = 0
    for value in state.values() if isinstance(state, dict) else []:
        if isinstance(value, torch.Tensor):
            value.sum()  # reads every page
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            total += touch(value)
    return total


def status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> int:
    """Resets the peak resident set to the current one, and returns that."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return status_kb("VmRSS")


torch.set_num_threads(1)
touch(Checkpoint.from_uri(sys.argv[2]).to_dict())
baseline = reset_peak()
state = Checkpoint.from_uri(sys.argv[1]).to_dict()
size = touch(state)
peak = status_kb("VmHWM")
print("RESULT " + json.dumps({"baseline_kb": baseline, "peak_kb": peak, "state_bytes": size}))
