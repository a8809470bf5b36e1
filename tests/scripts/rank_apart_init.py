"""Each rank starts from its own weights (seeded apart, as a script that loads pretrained weights
on rank 0 alone would); after engine.setup every rank must hold rank 0's. Writes rank<R>.json."""
import json
import os
import sys

import torch

from trainfleet import Engine

engine = Engine(seed=0)
torch.manual_seed(100 + engine.rank)  # rank-dependent start
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
start = {name: value.clone() for name, value in model.state_dict().items()}
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = engine.setup(model, optimizer)
full = {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().cpu()
        for name, value in engine.unwrap(model).state_dict().items()}
rank0 = engine.broadcast({name: value for name, value in start.items()} if engine.rank == 0 else None)
record = {"equal_to_rank0": all(torch.equal(full[n], rank0[n]) for n in full),
          "equal_to_own_start": all(torch.equal(full[n], start[n]) for n in full)}
with open(os.path.join(sys.argv[1], f"rank{engine.rank}.json"), "w") as handle:
    json.dump(record, handle)
engine.close()
