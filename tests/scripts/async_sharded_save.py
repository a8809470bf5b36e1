"""Under fsdp: a synchronous and an asynchronous sharded save of the same step, then training goes
on (the shards change) while the asynchronous one is written, and a second asynchronous save
follows at once (it waits for the first). OUT/sync, OUT/async (step 2) and OUT/later (step 5)."""
import sys
from pathlib import Path

import torch

from trainfleet import Engine

out = Path(sys.argv[1])
engine = Engine(strategy="fsdp", seed=0)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
model, optimizer = engine.setup(model, optimizer)


def train(steps):
    for _ in range(steps):
        engine.backward(model(torch.randn(4, 6)).pow(2).mean())
        engine.step(optimizer)


train(2)
engine.save(out / "sync", model=model, optimizer=optimizer, sharded=True, step=2)
engine.save(out / "async", model=model, optimizer=optimizer, sharded=True, asynchronous=True, step=2)
train(3)  # the optimizer updates the shards in place while the folder is written
engine.save(out / "later", model=model, optimizer=optimizer, sharded=True, asynchronous=True, step=5)
train(1)
engine.wait_for_checkpoint()
engine.close()
