"""Trains a small model through the engine with one fault injected on one rank, at one step.

    fault_train.py OUT --fault NAME [--rank R] [--step S] [--steps N] [--step-sleep T] [--factor F]

Faults: none, sleep (a hang in Python), gil (C code holding the GIL), deadlock (two threads, two locks, opposite order),
loader (the dataset never returns a sample), busy_outside (rank R computes for --pause s
outside the engine's calls: not a hang), skip (the rank skips one step), extra_all_reduce,
mismatch (an all_reduce of another size), slow_forward (the forward takes F x as long from the
start), slow_loader (each sample takes F x as long), pause_first (every rank waits --pause s
before its first step), nan (a non-finite loss on one rank), healthy (evaluation passes and
saves along the way: --save-every, --eval-every).
Rank 0 writes OUT/done.json at the end.
"""
import argparse
import json
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import trainfleet

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--fault", default="none")
parser.add_argument("--rank", type=int, default=1)
parser.add_argument("--step", type=int, default=5)
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--step-sleep", type=float, default=0.02, help="the forward's own time, every rank")
parser.add_argument("--factor", type=float, default=3.0)
parser.add_argument("--pause", type=float, default=10.0)
parser.add_argument("--save-every", type=int, default=0)
parser.add_argument("--eval-every", type=int, default=0)
args = parser.parse_args()
out = Path(args.out)

engine = trainfleet.Engine(seed=0)
me = engine.rank == args.rank


class Slow(torch.nn.Module):
    """A layer whose forward takes --step-sleep (x --factor on the slow rank)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        slow = args.fault == "slow_forward" and me
        time.sleep(args.step_sleep * (args.factor if slow else 1.0))
        return self.fc(x)


class Samples(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if args.fault == "slow_loader" and me:
            time.sleep(args.step_sleep * (args.factor - 1) / 4)  # 4 samples a batch
        if args.fault == "loader" and me and loader_step[0] == args.step:
            time.sleep(3600)  # the dataset never returns: a stuck loader
        return self.x[i], self.y[i]


loader_step = [0]
net = Slow()
model, optimizer = engine.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
loader = engine.dataloader(Samples(100_000), batch_size=4)
evaluation = engine.dataloader(Samples(64), batch_size=4, shuffle=False)
first, second = threading.Lock(), threading.Lock()


def hold_second_then_first():
    with second:
        time.sleep(0.2)
        with first:
            pass


if args.fault == "pause_first":
    time.sleep(args.pause)
step = 0
for x, y in loader:
    if me and step == args.step:
        if args.fault == "sleep":
            time.sleep(3600)  # FAULT: a hang in Python
        if args.fault == "busy_outside":  # not a fault: real work outside the engine's calls, --pause s
            until = time.monotonic() + args.pause
            while time.monotonic() < until:
                torch.randn(200, 200) @ torch.randn(200, 200)
        if args.fault == "gil":
            import ctypes
            ctypes.PyDLL(None).sleep(3600)  # FAULT: C code that holds the GIL (libc's sleep through PyDLL)
        if args.fault == "deadlock":
            threading.Thread(target=hold_second_then_first, name="other", daemon=True).start()
            with first:
                time.sleep(0.2)
                with second:  # FAULT: deadlock
                    pass
        if args.fault == "skip":
            step += 1
            continue  # FAULT: this rank skips a step
        if args.fault == "extra_all_reduce":
            engine.all_reduce(torch.ones(1))  # FAULT: one more collective than the others
        if args.fault == "mismatch":
            engine.all_reduce(torch.ones(7 + engine.rank))  # FAULT: another size than the others'
    loss = F.cross_entropy(model(x), y)
    if args.fault == "nan" and me and step == args.step:
        loss = loss * float("nan")  # FAULT: a non-finite loss on one rank
    engine.backward(loss)
    engine.step(optimizer)
    step += 1
    loader_step[0] = step
    if args.save_every and step % args.save_every == 0:
        engine.save(out / "ckpt" / f"step{step}.pt", model=model, optimizer=optimizer, keep_last=1, step=step)
    if args.eval_every and step % args.eval_every == 0:
        with torch.no_grad():
            total = sum(F.cross_entropy(model(ex), ey).item() for ex, ey in evaluation)
        engine.all_reduce(torch.tensor(total))
    if step >= args.steps:
        break
if engine.is_main:
    (out / "done.json").write_text(json.dumps({"step": step}))
