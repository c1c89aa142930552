"""Ray Train's "loading checkpoints" example on spotrun: continue from the latest checkpoint.

`spotrun.get_checkpoint()` is the checkpoint this attempt resumes from: the one the
operator recorded before restarting the group after a preemption, or `resumeFrom` in the
TrainJob (Ray's `resume_from_checkpoint`). Training continues at `epoch + 1`.

Unlike Ray's snippet, the optimizer state is saved and restored as well: Adam keeps
per-parameter moments and a step count, and without them the resumed run would take
different steps. With them (and the seeded data), a run interrupted after any epoch ends
with the same weights, bit for bit, as one that ran straight through.

    spotrun launch --nproc-per-node 2 --function examples.train_linear_resume:train_func
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Adam

import spotrun
from spotrun import Checkpoint


def toy_data(config: dict[str, Any], n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of examples/train_linear.py: X (n, 4) normal, Y (n, 1) uniform, seeded."""
    generator = torch.Generator().manual_seed(config.get("seed", 0))
    x = torch.randn(n, 4, generator=generator)
    y = torch.rand(n, 1, generator=generator)
    return x, y


def train_func(config: dict[str, Any]) -> None:
    torch.manual_seed(config.get("seed", 0))
    device = spotrun.get_device()
    n = 100
    # create a toy dataset
    # data   : X - dim = (n, 4)
    # target : Y - dim = (n, 1)
    X, Y = (t.to(device) for t in toy_data(config, n))

    # toy neural network : 1-layer
    model: nn.Module = nn.Linear(4, 1)
    criterion = nn.MSELoss()
    start_epoch = 0

    checkpoint = spotrun.get_checkpoint()
    checkpoint_dict = checkpoint.to_dict() if checkpoint else None
    if checkpoint_dict:
        model.load_state_dict(checkpoint_dict["model_weights"])
        start_epoch = checkpoint_dict.get("epoch", -1) + 1

    # wrap the model in DDP
    net = model
    model = spotrun.prepare_model(net)
    # Made after prepare_model so that a loaded state lands on the parameters' device.
    optimizer = Adam(model.parameters(), lr=3e-4)
    if checkpoint_dict and "optimizer_state" in checkpoint_dict:
        # Restoring Adam's moments and step count makes the resumed run bitwise identical
        # to an uninterrupted one; Ray's snippet restarts the optimizer from scratch.
        # (A checkpoint of examples/train_linear.py has weights only, as in Ray's guide.)
        optimizer.load_state_dict(checkpoint_dict["optimizer_state"])

    for epoch in range(start_epoch, config.get("num_epochs", 4)):
        y = model.forward(X)
        # compute loss
        loss = criterion(y, Y)
        # back-propagate loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state_dict = net.state_dict()  # the unwrapped module: no "module." prefix
        checkpoint = Checkpoint.from_dict(
            dict(epoch=epoch, model_weights=state_dict, optimizer_state=optimizer.state_dict())
        )
        spotrun.report({"epoch": epoch, "loss": loss.item()}, checkpoint=checkpoint)


if __name__ == "__main__":
    train_func(dict(spotrun.get_context().config))
