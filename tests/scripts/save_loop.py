"""Saves checkpoints in a loop until killed: step-<i>.pt with keep_last=2, every weight equal to i.

    save_loop.py DIR [--mb 8]
"""
import argparse
from pathlib import Path

import torch

import trainfleet

parser = argparse.ArgumentParser()
parser.add_argument("dir")
parser.add_argument("--mb", type=int, default=8)
args = parser.parse_args()
folder = Path(args.dir)
engine = trainfleet.Engine(strategy="single")
model = torch.nn.Linear(args.mb * 2**18 // 1024, 1024, bias=False)  # args.mb MB of float32
step = 0
while True:
    step += 1
    with torch.no_grad():
        model.weight.fill_(step)
    engine.save(folder / f"step-{step}.pt", model=model, keep_last=2, step=step)
    engine.save(folder / "same.pt", model=model, step=step)  # overwritten in place every time
    (folder / "progress").write_text(str(step))
