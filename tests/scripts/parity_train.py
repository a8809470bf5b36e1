"""Trains LeNet on synthetic data through the engine; rank 0 writes losses and weights.

    parity_train.py OUT_DIR [--steps N] [--global-batch-size G] [--accumulate K]
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import trainfleet
from trainfleet.datasets import build_dataset
from trainfleet.models import build_model

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--global-batch-size", type=int, default=16)
args = parser.parse_args()

engine = trainfleet.Engine(seed=1)
dataset = build_dataset("synthetic", num_samples=64, shape=(1, 16, 16), num_classes=4)
model = build_model("lenet", num_classes=4, in_channels=1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model, optimizer = engine.setup(model, optimizer)
loader = engine.dataloader(dataset, global_batch_size=args.global_batch_size)

losses, step = [], 0
while step < args.steps:
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        engine.backward(loss)
        engine.step(optimizer)
        losses.append(engine.all_reduce(loss.detach(), op="mean").item())
        step += 1
        if step == args.steps:
            break

out = Path(args.out)
engine.save(out / "final.pt", model=model)
if engine.is_main:
    (out / "losses.json").write_text(json.dumps({"losses": losses, "world_size": engine.world_size,
                                                 "strategy": engine.strategy.name}))
