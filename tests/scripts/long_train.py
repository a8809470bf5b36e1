"""Trains until told to stop; checkpoints every step and resumes from the latest one.

    long_train.py OUT [--steps N] [--crash-rank R --crash-step S] [--step-sleep T]

Each rank writes OUT/ready.rank<R> (its pid) once training runs, OUT/stop.rank<R> (the
stop signal) when should_stop() agrees, and rank 0 writes OUT/done.json at the end.
--crash-rank/--crash-step make that rank raise at that step, in the first attempt only.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import trainfleet

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=100000)
parser.add_argument("--crash-rank", type=int)
parser.add_argument("--crash-step", type=int, default=3)
parser.add_argument("--step-sleep", type=float, default=0.05)
parser.add_argument("--stop-sleep", type=float, default=0.0, help="a slow exit after a stop request")
args = parser.parse_args()
out = Path(args.out)
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))

engine = trainfleet.Engine(seed=0)
model = torch.nn.Linear(8, 2)
model, optimizer = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
step = 0
if (out / "ckpt" / "latest.json").exists():
    step = engine.load(out / "ckpt", model=model, optimizer=optimizer)["step"]
(out / f"ready.rank{engine.rank}").write_text(f"{os.getpid()} {attempt} {step}")
x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), torch.randint(0, 2, (16,))
while step < args.steps:
    if attempt == 0 and engine.rank == args.crash_rank and step == args.crash_step:
        raise RuntimeError(f"injected crash at step {step}")
    loss = F.cross_entropy(model(x), y)
    engine.backward(loss)
    engine.step(optimizer)
    step += 1
    engine.save(out / "ckpt" / f"step-{step}.pt", model=model, optimizer=optimizer, keep_last=2, step=step)
    if engine.should_stop():
        (out / f"stop.rank{engine.rank}").write_text(str(engine.stop_signal))
        time.sleep(args.stop_sleep)
        break
    time.sleep(args.step_sleep)
if engine.is_main:
    (out / "done.json").write_text(json.dumps({"step": step, "attempt": attempt, "world": engine.world_size}))
