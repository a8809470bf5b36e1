"""A small engine job with costs injected where the ledger must find them (tests/launcher/test_ledger.py).

    ledger_train.py OUT [--steps N] [--step-time S] [--sleep-before-first S] [--save-stall S --save-at K]
                    [--eval-at K --eval-time S] [--checkpoint-every K] [--kill-at K]

--sleep-before-first sleeps after the engine is made, before the first step; --save-stall makes the
synchronous save at step K take that long (its payload takes that long to serialise, inside
engine.save); --eval-at runs an evaluation pass over a held-out loader whose batches take
--eval-time in all; --checkpoint-every saves to OUT/ckpt and resumes from it; --kill-at makes rank 1
kill itself (SIGKILL) at that step of the first attempt. Rank 0 writes OUT/steps.<attempt> with the
global steps it computed.
"""
import argparse
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from slow_payload import Slow  # the script's folder is on sys.path, as under python

import trainfleet
from trainfleet.datasets import build_dataset

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--step-time", type=float, default=0.05)
parser.add_argument("--sleep-before-first", type=float, default=0.0)
parser.add_argument("--save-stall", type=float, default=0.0)
parser.add_argument("--save-at", type=int, default=5)
parser.add_argument("--eval-at", type=int, default=0)
parser.add_argument("--eval-time", type=float, default=0.0)
parser.add_argument("--checkpoint-every", type=int, default=0)
parser.add_argument("--kill-at", type=int, default=0)
args = parser.parse_args()
out = Path(args.out)


engine = trainfleet.Engine(seed=1)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
model, optimizer = engine.setup(model, optimizer)
data = build_dataset("synthetic", num_samples=4096, shape=(1, 4, 4), num_classes=4)
loader = engine.dataloader(data, global_batch_size=8)
held_out = engine.dataloader(build_dataset("synthetic", num_samples=16, shape=(1, 4, 4), num_classes=4),
                             global_batch_size=8, shuffle=False)
ckpt = out / "ckpt"
step = engine.resume(model, optimizer, dataloader=loader, path=ckpt).get("step", 0) if args.checkpoint_every else 0
done: list[int] = []
if args.sleep_before_first:
    time.sleep(args.sleep_before_first)
for x, y in loader:
    if step >= args.steps:
        break
    if args.kill_at and step + 1 == args.kill_at and engine.rank == 1 and engine.restart_count == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    loss = F.cross_entropy(model(x), y)
    engine.backward(loss)
    time.sleep(args.step_time)
    engine.step(optimizer)
    step += 1
    done.append(step)
    if args.save_stall and step == args.save_at:
        engine.save(out / "stall.pt", model=model, optimizer=optimizer, slow=Slow(args.save_stall))
    if args.eval_at and step == args.eval_at:
        model.eval()
        with torch.no_grad():
            for x_eval, _ in held_out:
                model(x_eval)
                time.sleep(args.eval_time / max(len(held_out), 1))
        model.train()
    if args.checkpoint_every and step % args.checkpoint_every == 0:
        engine.save(ckpt / f"step{step}.pt", model=model, optimizer=optimizer, dataloader=loader, step=step,
                    keep_last=2)
if engine.rank == 0:
    (out / f"steps.{engine.restart_count}").write_text(" ".join(map(str, done)))
