"""Diagnosis measurements inside one launched job (2 gloo workers):

    launch --gpus 2 diagnosis_probe.py OUT MODE [--step-sleep T] [--factor F] [--steps N] [--rounds R]

MODE:
  hang       steps of --step-sleep s; rank 1 stops in Python at --at and writes OUT/onset.json (time.time())
  straggler  rank 1's forward takes --factor x the others' (--step-sleep s); trains --steps steps
  overhead   rounds of 2 x --steps steps (an MLP --width wide), the progress board on and off in turn step
             by step, in the same workers; rank 0 writes OUT/overhead.json with each round's median step
             time per side
  snapshot   the same with Adam, the engine's copy of the state into host memory after each step
             (engine/snapshot.py: what in-place recovery and rollback use) on and off in turn; rank 0
             writes OUT/snapshot.json (each round's median per side, the copy's size and time);
             with --copy-shards (launch --nodes 2 --gpus 1 --strategy fsdp) each rank's shards go to
             the next node too (engine/replicas.py)
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import trainfleet  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("mode", choices=["hang", "straggler", "overhead", "snapshot"])
parser.add_argument("--step-sleep", type=float, default=0.1)
parser.add_argument("--factor", type=float, default=1.3)
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--at", type=int, default=30)
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--width", type=int, default=256, help="the hidden layer: the step's compute")
parser.add_argument("--copy-shards", action="store_true",
                    help="snapshot under fsdp on 2+ nodes: the copy sends each rank's shards to the next node too")
args = parser.parse_args()
out = Path(args.out)
torch.set_num_threads(1)
engine = trainfleet.Engine(seed=0)
slow = args.mode == "straggler" and engine.rank == 1


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, args.width), torch.nn.ReLU(),
                                        torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
                                        torch.nn.Linear(args.width, 10))

    def forward(self, x):
        if args.step_sleep:
            time.sleep(args.step_sleep * (args.factor if slow else 1.0))
        return self.body(x)


net = Net()
optimizer = torch.optim.Adam(net.parameters(), lr=1e-4) if args.mode == "snapshot" else \
    torch.optim.SGD(net.parameters(), lr=0.01)
model, optimizer = engine.setup(net, optimizer)
engine.copies_shards = args.copy_shards  # (an elastic job turns it on; this run is not elastic)
data = torch.utils.data.TensorDataset(torch.randn(100_000, 64), torch.randint(0, 10, (100_000,)))
loader = engine.dataloader(data, batch_size=32)
batches = iter(loader)


def step() -> float:
    global batches
    start = time.perf_counter()
    try:
        x, y = next(batches)
    except StopIteration:  # the next epoch
        batches = iter(loader)
        x, y = next(batches)
    loss = F.cross_entropy(model(x), y)
    engine.backward(loss)
    engine.step(optimizer)
    return time.perf_counter() - start


if args.mode == "hang":
    for index in range(args.steps):
        if index == args.at and engine.rank == 1:
            (out / "onset.json").write_text(json.dumps({"t": time.time()}))
            time.sleep(3600)
        step()
elif args.mode == "straggler":
    for _ in range(args.steps):
        step()
elif args.mode == "snapshot":
    samples = {"on": [], "off": []}
    for index in range(args.rounds + 1):  # the first round warms up
        times = {"on": [], "off": []}
        for i in range(2 * args.steps):
            side = ("on", "off")[(i + index) % 2]
            engine.keep_snapshot = side == "on"
            times[side].append(step())
        if index:
            for side in samples:
                samples[side].append(statistics.median(times[side]))
    if engine.is_main:
        ring = engine._ring.nbytes() if engine._ring is not None else 0  # fsdp: the staging buffer and 2 slots
        (out / "snapshot.json").write_text(json.dumps({**samples, "bytes": engine.snapshot.nbytes(),
                                                       "ring_bytes": ring, "copy_s": engine.snapshot.seconds}))
else:
    board = engine.progress
    samples = {"on": [], "off": []}
    for index in range(args.rounds + 1):  # the first round warms up
        times = {"on": [], "off": []}
        for i in range(2 * args.steps):  # the two sides take turns step by step: they meet the same moments
            side = ("on", "off")[(i + index) % 2]
            engine.progress = loader.board = board if side == "on" else None
            times[side].append(step())
        if index:
            for side in samples:
                samples[side].append(statistics.median(times[side]))
    engine.progress = loader.board = board
    if engine.is_main:
        (out / "overhead.json").write_text(json.dumps(samples))
