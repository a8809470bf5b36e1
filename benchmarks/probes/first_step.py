"""Rank 0 records the wall-clock time once the first training step is done (init, model, data, one step)."""
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import trainfleet
from trainfleet.datasets import build_dataset
from trainfleet.models import build_model

engine = trainfleet.Engine(seed=0)
model = build_model("lenet", num_classes=10, in_channels=1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
model, optimizer = engine.setup(model, optimizer)
loader = engine.dataloader(build_dataset("synthetic", num_samples=64, shape=(1, 28, 28), num_classes=10),
                           global_batch_size=16)
x, y = next(iter(loader))
engine.backward(F.cross_entropy(model(x), y))
engine.step(optimizer)
if engine.is_main:
    Path(sys.argv[1], "first_step.json").write_text(json.dumps({"t": time.time(), "world": engine.world_size}))
