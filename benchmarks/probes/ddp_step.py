"""Times DDP training steps two ways on the same model and data.

    ddp_step.py OUT_DIR engine|handwritten [--steps N] [--warmup W] [--model resnet18] [--batch B]

``engine`` goes through trainfleet.Engine; ``handwritten`` is the textbook loop:
init_process_group, DDP, DistributedSampler, backward, step, zero_grad.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from trainfleet.models import build_model

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("mode", choices=["engine", "handwritten"])
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--model", default="resnet18")
parser.add_argument("--batch", type=int, default=32, help="per worker")
args = parser.parse_args()

torch.manual_seed(0)
world = int(os.environ.get("WORLD_SIZE", 1))
samples = args.batch * world * (args.steps + args.warmup)
data = TensorDataset(torch.randn(samples, 3, 32, 32), torch.randint(0, 10, (samples,)))
model = build_model(args.model, num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

if args.mode == "engine":
    import trainfleet

    engine = trainfleet.Engine(strategy="ddp", seed=0)
    model, optimizer = engine.setup(model, optimizer)
    loader = engine.dataloader(data, batch_size=args.batch)
    rank = engine.rank

    def train_step(x, y):
        loss = F.cross_entropy(model(x), y)
        engine.backward(loss)
        engine.step(optimizer)
else:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(model)
    loader = DataLoader(data, batch_size=args.batch, sampler=DistributedSampler(data, seed=0))

    def train_step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

times = []
batches = iter(loader)
for step in range(args.warmup + args.steps):
    start = time.perf_counter()
    x, y = next(batches)
    train_step(x, y)
    times.append(time.perf_counter() - start)
if rank == 0:
    with open(os.path.join(args.out, f"{args.mode}.json"), "w") as handle:
        json.dump({"step_times": times[args.warmup:]}, handle)
