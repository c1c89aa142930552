"""An elastic workload: every use of every sample is counted in the replicated state.

Linear regression with SGD over a dataset of sample ids, through prepare_data_loader and
prepare_model. The state carries, beside the model and optimizer, how often each sample
was trained on (summed over the group at every step) and the global loss of every step,
so a run that shrinks and grows can be checked against a fault-free one: each sample
exactly once per epoch, and the same loss curve.

config: samples, batch (per worker at the target size), epochs, checkpoint_every,
step_seconds, out (rank 0 saves the final state there).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import spotrun
from spotrun import Checkpoint


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def train(config: dict[str, Any]) -> None:
    ctx = spotrun.get_context()
    samples, epochs = int(config["samples"]), int(config["epochs"])
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(samples, 1, generator=generator)
    dataset = TensorDataset(torch.arange(samples), x, y)
    loader = spotrun.prepare_data_loader(
        DataLoader(dataset, batch_size=int(config["batch"]), shuffle=True)
    )
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 1)
    optim = torch.optim.SGD(net.parameters(), lr=0.05)
    seen = torch.zeros(epochs, samples, dtype=torch.int64)
    curve = torch.full((epochs * len(dataset),), float("nan"), dtype=torch.float64)
    step = 0
    checkpoint = spotrun.get_checkpoint()
    if checkpoint is not None:
        state = checkpoint.to_dict()
        net.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        seen, curve, step = state["seen"], state["curve"], int(state["step"]) + 1
    model = spotrun.prepare_model(net)
    every = int(config.get("checkpoint_every", 1))

    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for ids, xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            optim.zero_grad()
            loss.backward()
            optim.step()
            counts = _sum(torch.bincount(ids, minlength=samples))
            total = _sum(torch.tensor([loss.item() * len(ids), len(ids)], dtype=torch.float64))
            seen[epoch] += counts
            curve[step] = total[0] / total[1]
            time.sleep(float(config.get("step_seconds", 0)))
            state = {
                "model": net.state_dict(),
                "optim": optim.state_dict(),
                "seen": seen,
                "curve": curve,
                "step": step,
            }
            due = spotrun.should_checkpoint() or step % every == 0
            spotrun.report(
                {"step": step, "loss": float(curve[step]), "world": ctx.world_size},
                checkpoint=Checkpoint.from_dict(state) if due else None,
            )
            step += 1

    if ctx.world_rank == 0 and config.get("out"):
        final = {"model": net.state_dict(), "seen": seen, "curve": curve[:step], "step": step}
        torch.save(final, str(config["out"]))
