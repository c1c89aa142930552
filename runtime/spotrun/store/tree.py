"""Splits a checkpoint's nested state into a skeleton and a flat list of tensors, and back.

Replicated state (DDP: every rank holds the same weights) is written by all ranks at once,
each writing a share of the tensors; the skeleton keeps everything else in place. Pure:
it never copies tensor data.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

_MARK = "__spotrun_tensor__"


def flatten(obj: Any) -> tuple[Any, list[torch.Tensor]]:
    """(skeleton, tensors): the skeleton holds ("__spotrun_tensor__", i) where tensor i was."""
    tensors: list[torch.Tensor] = []

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            tensors.append(node)
            return (_MARK, len(tensors) - 1)
        if isinstance(node, OrderedDict):
            return OrderedDict((k, walk(v)) for k, v in node.items())
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, tuple) and not hasattr(node, "_fields"):
            return tuple(walk(v) for v in node)
        return node

    return walk(obj), tensors


def unflatten(skeleton: Any, lookup: Callable[[int], torch.Tensor]) -> Any:
    def walk(node: Any) -> Any:
        if (
            isinstance(node, tuple)
            and len(node) == 2
            and node[0] == _MARK
            and isinstance(node[1], int)
        ):
            return lookup(node[1])
        if isinstance(node, OrderedDict):
            return OrderedDict((k, walk(v)) for k, v in node.items())
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, tuple):
            return tuple(walk(v) for v in node)
        return node

    return walk(skeleton)


def partition(sizes: Sequence[int], writers: Sequence[int]) -> dict[int, list[int]]:
    """Assigns tensor indices to writer ranks, balancing bytes (largest first, to the lightest).

    Deterministic: every rank computes the same assignment from the same sizes.
    """
    if not writers:
        raise ValueError("at least one rank must write the checkpoint")
    load = {w: 0 for w in writers}
    parts: dict[int, list[int]] = {w: [] for w in writers}
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(writers, key=lambda w: (load[w], w))
        parts[target].append(index)
        load[target] += sizes[index]
    return {w: sorted(ix) for w, ix in parts.items()}


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
