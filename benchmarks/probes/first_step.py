"""Rank 0 records the wall-clock time once the first training step is done (init, model, data, one step),
and when its script started (before importing torch)."""
import time

STARTED = time.time()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import trainfleet  # noqa: E402
from trainfleet.datasets import build_dataset  # noqa: E402
from trainfleet.models import build_model  # noqa: E402

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
    Path(sys.argv[1], "first_step.json").write_text(json.dumps({"t": time.time(), "script_start": STARTED, "world": engine.world_size}))
