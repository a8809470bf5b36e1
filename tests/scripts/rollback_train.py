"""Trains a small model with BatchNorm and dropout (state a forward changes: buffers, RNG) and
injects non-finite losses, or skips batches, at given steps.

    rollback_train.py OUT [--steps N] [--inject STEP:RANK,...] [--skip STEP,...]

--inject multiplies rank RANK's loss by NaN at loop iteration STEP (counted from 1, one batch
each); --skip drops the batch of those iterations on every rank before its forward (the
reference a rollback must equal). Rank 0 writes OUT/final.pt (the model's weights) and
OUT/rollbacks.json (the engine's rollback history) at the end.
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import trainfleet

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--inject", default="")
parser.add_argument("--skip", default="")
args = parser.parse_args()
inject = {tuple(int(v) for v in item.split(":")) for item in args.inject.split(",") if item}
skip = {int(v) for v in args.skip.split(",") if v}

engine = trainfleet.Engine(seed=3)
g = torch.Generator().manual_seed(0)
x_all, y_all = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
dataset = torch.utils.data.TensorDataset(x_all, y_all)
net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                          torch.nn.Linear(16, 3))
model, optimizer = engine.setup(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
loader = engine.dataloader(dataset, global_batch_size=8)

step = 0
while step < args.steps:
    for x, y in loader:
        step += 1
        if step not in skip:
            loss = F.cross_entropy(model(x), y)
            if (step, engine.rank) in inject:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step(optimizer)
        if step == args.steps:
            break

weights = engine.state_dict(model=model)["model"]  # whole, on rank 0 (a collective: fsdp gathers)
if engine.is_main:
    out = Path(args.out)
    torch.save(weights, out / "final.pt")
    history = engine.rollback.history if engine.rollback is not None else []
    (out / "rollbacks.json").write_text(json.dumps(history))
