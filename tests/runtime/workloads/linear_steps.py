"""A deterministic DDP workload for runtime tests: Linear + Adam, a checkpoint every N steps.

It trains on this worker's device (spotrun.get_device(): cuda:LOCAL_RANK on a GPU).

config: steps, checkpoint_every, step_seconds, extra_mb (ballast in the checkpoint),
kill_after_step/kill_rank (flush, then SIGKILL that rank), kill_before_upload_step (that rank
SIGKILLs itself right after report() hands over the snapshot), raise_after_step (every rank
raises right after that step's report), step_metric (the "step" metric reported at each
step, by index: training code's own numbering), out (rank 0 saves the weights).
"""

from __future__ import annotations

import os
import signal
import time

import torch

import spotrun
from spotrun import Checkpoint
from spotrun.train.group import get_device
from spotrun.train.session import get_session

ctx = spotrun.get_context()
cfg = ctx.config
torch.manual_seed(int(cfg.get("seed", 0)))
device = get_device()
# On the device before the optimizer exists, so a resumed optimizer state lands beside it.
net = torch.nn.Linear(8, 1).to(device)
print(f"rank {ctx.world_rank} trains on {device}", flush=True)
optim = torch.optim.Adam(net.parameters(), lr=1e-2)
# Two equal ballast tensors, so that with two ranks each writes one of them.
half = int(cfg.get("extra_mb", 0)) * (1 << 17)
ballast = [torch.arange(half, dtype=torch.float32), torch.arange(half, dtype=torch.float32) + 1]
start = 0
checkpoint = spotrun.get_checkpoint()
if checkpoint:
    state = checkpoint.to_dict()
    net.load_state_dict(state["model"])
    optim.load_state_dict(state["optim"])
    start = state["step"] + 1
    print(f"rank {ctx.world_rank} resumed at step {start} from {checkpoint.uri}", flush=True)
model = spotrun.prepare_model(net)

data = torch.Generator().manual_seed(1234)
X = torch.randn(256, 8, generator=data)
Y = X.sum(dim=1, keepdim=True) + 0.1 * torch.randn(256, 1, generator=data)
X, Y = X.to(device), Y.to(device)
every = int(cfg.get("checkpoint_every", 1))

for step in range(start, int(cfg["steps"])):
    rows = torch.arange(step * 8 + ctx.world_rank * 4, step * 8 + ctx.world_rank * 4 + 4) % 256
    loss = torch.nn.functional.mse_loss(model(X[rows]), Y[rows])
    optim.zero_grad()
    loss.backward()
    optim.step()
    time.sleep(float(cfg.get("step_seconds", 0)))
    due = spotrun.should_checkpoint() if cfg.get("use_cadence", True) else False
    ckpt = None
    if due or step % every == 0:
        ckpt = Checkpoint.from_dict(
            {
                "model": net.state_dict(),
                "optim": optim.state_dict(),
                "step": step,
                "ballast": ballast,
            }
        )
    numbering = cfg.get("step_metric")
    reported = numbering[step] if numbering else step
    spotrun.report({"step": reported, "loss": loss.item()}, checkpoint=ckpt)
    if step == cfg.get("raise_after_step"):
        raise RuntimeError(f"the training code failed after step {step}")
    if step == cfg.get("kill_before_upload_step") and ctx.world_rank == cfg.get("kill_rank", 1):
        # The node dies: its checkpoint writer with it, not the few ms later its parent
        # death signal would take (in which a fast disk finishes a small shard).
        writer = get_session().writer._proc
        if writer is not None:
            os.kill(writer.pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if step == cfg.get("kill_after_step"):
        get_session().flush()
        if ctx.world_rank == cfg.get("kill_rank", 1):
            os.kill(os.getpid(), signal.SIGKILL)

if ctx.world_rank == 0 and cfg.get("out"):
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, cfg["out"])
