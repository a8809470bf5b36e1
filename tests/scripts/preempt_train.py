"""A preemptible run: resumes from the job's checkpoint folder, stops at a checkpoint on request.

    preempt_train.py OUT_DIR [--steps N] [--step-sleep S] [--global-batch-size G]

Every step rank 0 writes the step reached to OUT_DIR/progress; on ``engine.should_stop()``
all ranks save to ``engine.checkpoint_dir`` and exit 0. At the end rank 0 writes
OUT_DIR/final.pt and OUT_DIR/losses.json (the losses of every step, across requeues).
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import trainfleet
from trainfleet.datasets import build_dataset
from trainfleet.models import build_model

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--step-sleep", type=float, default=0.0)
parser.add_argument("--global-batch-size", type=int, default=8)
args = parser.parse_args()
out = Path(args.out)

engine = trainfleet.Engine(seed=5)
dataset = build_dataset("synthetic", num_samples=40, shape=(1, 12, 12), num_classes=4)
model = build_model("lenet", num_classes=4, in_channels=1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
model, optimizer = engine.setup(model, optimizer)
loader = engine.dataloader(dataset, global_batch_size=args.global_batch_size)

state = engine.resume(model, optimizer, dataloader=loader)
step, losses = state.get("step", 0), list(state.get("losses", []))
while step < args.steps:
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        engine.backward(loss)
        engine.step(optimizer)
        losses.append(engine.all_reduce(loss.detach(), op="mean").item())
        step += 1
        if engine.is_main:
            (out / "progress").write_text(str(step))
        time.sleep(args.step_sleep)
        if step == args.steps:
            break
        if engine.should_stop():
            engine.save(engine.checkpoint_dir / f"step{step}.pt", model=model, optimizer=optimizer,
                        dataloader=loader, keep_last=2, step=step, losses=losses)
            engine.print(f"stopped at step {step}: checkpoint saved")
            raise SystemExit(0)

engine.save(out / "final.pt", model=model)
if engine.is_main:
    (out / "losses.json").write_text(json.dumps({"losses": losses, "world_size": engine.world_size}))
