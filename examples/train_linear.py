"""Ray Train's checkpointing example on spotrun: a toy model that reports a checkpoint every epoch.

A Ray Train user should recognise `train_func` line for line (ray.train -> spotrun). The
departures are for reproducibility, which spotrun promises across a preemption: a fixed
seed, data drawn from a seeded generator (the same X, Y on every rank), and the state of
the module passed to prepare_model is saved, not the DDP wrapper's, so its keys load into
a plain nn.Linear at any world size.

`train_func_steps` is the longer-running variant that local-mode demos and preemption
tests use: `steps` optimizer steps over a resumable data loader, a checkpoint every
`checkpoint_every` steps (and whenever spotrun asks for one: a preemption notice, or the
checkpoint cadence), and a run resumed from any of its checkpoints ends with the same
weights, bit for bit, as one that was never interrupted.

    spotrun launch --nproc-per-node 2 --function examples.train_linear:train_func
    spotrun launch --nproc-per-node 2 -- python examples/train_linear.py
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.optim import Adam
from torch.utils.data import DataLoader, TensorDataset

import spotrun
from spotrun import Checkpoint


def toy_data(config: dict[str, Any], n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """X: (n, 4) normal, Y: (n, 1) uniform, as in Ray's example; identical on every rank."""
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
    # wrap the model in DDP
    net = nn.Linear(4, 1)
    model = spotrun.prepare_model(net)
    criterion = nn.MSELoss()

    optimizer = Adam(model.parameters(), lr=3e-4)
    for epoch in range(config.get("num_epochs", 5)):
        y = model.forward(X)
        # compute loss
        loss = criterion(y, Y)
        # back-propagate loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # `net` shares its parameters with the DDP wrapper and has no "module." prefix.
        state_dict = net.state_dict()
        checkpoint = Checkpoint.from_dict(dict(epoch=epoch, model_weights=state_dict))
        spotrun.report({"epoch": epoch, "loss": loss.item()}, checkpoint=checkpoint)


def train_func_steps(config: dict[str, Any]) -> None:
    """`config["steps"]` steps, sleeping `step_seconds` each, resumable at any checkpoint."""
    steps = int(config["steps"])
    step_seconds = float(config.get("step_seconds", 0))
    every = int(config.get("checkpoint_every", 1))
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    X, Y = toy_data(config, int(config.get("samples", 64)))

    net = nn.Linear(4, 1)
    start = 0
    checkpoint = spotrun.get_checkpoint()
    saved = checkpoint.to_dict() if checkpoint else None
    if saved is not None:
        net.load_state_dict(saved["model_weights"])
        start = saved["step"] + 1
    model = spotrun.prepare_model(net)
    # Made after prepare_model, so a loaded state lands on the device of the parameters.
    optimizer = Adam(model.parameters(), lr=float(config.get("lr", 3e-3)))
    if saved is not None:
        # Adam's moments and step count are state too: without them a resumed run diverges.
        optimizer.load_state_dict(saved["optimizer_state"])
    criterion = nn.MSELoss()
    # The loader's position (epoch, batches consumed) is saved with every checkpoint and
    # restored here, so the resumed run trains on exactly the batches it had not seen.
    loader = spotrun.prepare_data_loader(
        DataLoader(TensorDataset(X, Y), batch_size=int(config.get("batch_size", 8)), shuffle=True),
        seed=seed,
    )

    # Extra state for benchmarks (`ballast_mb`): a checkpoint of that many more MiB.
    ballast_mb = int(config.get("ballast_mb", 0))
    ballast = (
        saved["ballast"] if saved is not None and ballast_mb else torch.zeros(ballast_mb << 18)
    )

    step = start
    epoch = loader.epoch
    while step < steps:
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step_seconds:
                time.sleep(step_seconds)
            due = (step + 1) % every == 0 or step + 1 == steps
            # Every rank computes `due` alike, so all of them take part in this collective.
            if due or spotrun.should_checkpoint():
                state = dict(
                    step=step,
                    model_weights=net.state_dict(),
                    optimizer_state=optimizer.state_dict(),
                )
                if ballast_mb:
                    state["ballast"] = ballast
                checkpoint = Checkpoint.from_dict(state)
            else:
                checkpoint = None
            spotrun.report({"step": step, "loss": loss.item()}, checkpoint=checkpoint)
            step += 1
            if step >= steps:
                break
        epoch += 1


if __name__ == "__main__":
    train_func(dict(spotrun.get_context().config))
