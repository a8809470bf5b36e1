"""Times training steps of one model, through the engine or hand-written.

    step_probe.py OUT_DIR MODE [--steps N] [--warmup W] [--model resnet18] [--batch B] [--autocast bf16]

MODE: ``engine`` (trainfleet.Engine, strategy and precision from the launcher),
``ddp_hand`` (init_process_group + DDP + DistributedSampler), ``hvd_hand`` (hvd.init +
DistributedOptimizer + broadcasts, the Horovod tutorial loop), ``single_hand`` (a plain
loop; ``--autocast bf16`` wraps its forward in torch.autocast), or ``engine+ddp_hand`` /
``engine+hvd_hand``: both loops in the same workers, one step of each in turn (who goes first
alternates), so the pair of step times shares the process, its threads and the machine's moment.
Rank 0 writes OUT_DIR/<MODE>.json with the step times after warm-up (one list per loop).
"""
import argparse
import contextlib
import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from trainfleet.models import build_model

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("mode", choices=["engine", "ddp_hand", "hvd_hand", "single_hand", "engine+ddp_hand",
                                     "engine+hvd_hand"])
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--model", default="resnet18")
parser.add_argument("--batch", type=int, default=32, help="per worker")
parser.add_argument("--autocast", choices=["none", "bf16"], default="none", help="single_hand only")
parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step (engine, ddp_hand)")
args = parser.parse_args()

torch.manual_seed(0)
world = int(os.environ.get("WORLD_SIZE", 1))
samples = args.batch * world * (args.steps + args.warmup) * args.accumulate
data = TensorDataset(torch.randn(samples, 3, 32, 32), torch.randint(0, 10, (samples,)))
first_model = build_model(args.model, num_classes=10)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def engine_loop(model):
    import trainfleet

    engine = trainfleet.Engine(seed=0)
    model, optimizer = engine.setup(model, sgd(model))

    def train_step(batches):
        for micro, (x, y) in enumerate(batches):
            with engine.no_sync(model) if micro < len(batches) - 1 else contextlib.nullcontext():
                with engine.autocast():
                    loss = F.cross_entropy(model(x), y) / len(batches)
                engine.backward(loss)
        engine.step(optimizer)
    return train_step, iter(engine.dataloader(data, batch_size=args.batch)), engine.rank


def hand_loop(model, mode):
    optimizer, rank = sgd(model), 0
    if mode == "ddp_hand":
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        rank = dist.get_rank()
        model = torch.nn.parallel.DistributedDataParallel(model)
        loader = DataLoader(data, batch_size=args.batch, sampler=DistributedSampler(data, seed=0))
    elif mode == "hvd_hand":
        import horovod.torch as hvd

        hvd.init()
        rank = hvd.rank()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        loader = DataLoader(data, batch_size=args.batch,
                            sampler=DistributedSampler(data, num_replicas=hvd.size(), rank=hvd.rank(), seed=0))
    else:
        loader = DataLoader(data, batch_size=args.batch, shuffle=True)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.autocast == "bf16" \
        else contextlib.nullcontext

    def train_step(batches):
        for micro, (x, y) in enumerate(batches):
            skip_sync = micro < len(batches) - 1 and hasattr(model, "no_sync")
            with model.no_sync() if skip_sync else contextlib.nullcontext():
                with autocast():
                    loss = F.cross_entropy(model(x), y) / len(batches)
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return train_step, iter(loader), rank


names = args.mode.split("+")
loops = {}
for index, name in enumerate(names):
    model = first_model if index == 0 else copy.deepcopy(first_model)
    loops[name] = engine_loop(model) if name == "engine" else hand_loop(model, name)
rank = loops[names[0]][2]

times = {name: [] for name in names}
for step in range(args.warmup + args.steps):
    for name in names if step % 2 == 0 else reversed(names):
        train_step, batches, _ = loops[name]
        start = time.perf_counter()
        train_step([next(batches) for _ in range(args.accumulate)])
        times[name].append(time.perf_counter() - start)
if rank == 0:
    record = {"samples_per_step": args.batch * world * args.accumulate}
    record.update({f"step_times.{name}": t[args.warmup:] for name, t in times.items()})
    record["step_times"] = times[names[0]][args.warmup:]
    with open(os.path.join(args.out, f"{args.mode}.json"), "w") as handle:
        json.dump(record, handle)
