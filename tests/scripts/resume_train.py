"""Train LeNet for --total-steps; optionally stop (and save) after --stop-at, or resume from a checkpoint.

    resume_train.py OUT --tag T [--stop-at K] [--resume-from CKPT] [--total-steps N] [--global-batch-size G]
                    [--dropout P] [--no-restore-rng]

Every rank records the dataset indices it trained on, per epoch, in OUT/seen.T.rank<R>.json;
rank 0 writes the final weights to OUT/final.T.pt.
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import trainfleet
from trainfleet.datasets import build_dataset
from trainfleet.models import build_model

from indexed import WithIndex  # tests/scripts, next to this script


parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--tag", required=True)
parser.add_argument("--total-steps", type=int, default=10)
parser.add_argument("--stop-at", type=int)
parser.add_argument("--resume-from")
parser.add_argument("--global-batch-size", type=int, default=8)
parser.add_argument("--dropout", type=float, default=0.0, help="a Dropout after the first hidden layer")
parser.add_argument("--no-restore-rng", action="store_true", help="resume without the saved RNG states")
args = parser.parse_args()
out = Path(args.out)

engine = trainfleet.Engine(seed=3)
dataset = WithIndex(build_dataset("synthetic", num_samples=48, shape=(1, 12, 12), num_classes=4))
model = build_model("lenet", num_classes=4, in_channels=1)
if args.dropout:
    model.classifier.insert(3, torch.nn.Dropout(args.dropout))  # its masks come from each rank's RNG
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
model, optimizer = engine.setup(model, optimizer)
loader = engine.dataloader(dataset, global_batch_size=args.global_batch_size)

step = 0
if args.resume_from:
    step = engine.load(args.resume_from, model=model, optimizer=optimizer, dataloader=loader,
                       restore_rng=not args.no_restore_rng)["step"]

seen: dict[str, list[int]] = {}
while step < args.total_steps:
    for x, y, index in loader:
        seen.setdefault(str(loader.epoch), []).extend(index.tolist())
        loss = F.cross_entropy(model(x), y)
        engine.backward(loss)
        engine.step(optimizer)
        step += 1
        if step == args.stop_at:
            engine.save(out / f"ckpt.{args.tag}.pt", model=model, optimizer=optimizer, dataloader=loader, step=step)
            break
        if step == args.total_steps:
            break
    if step == args.stop_at:
        break

(out / f"seen.{args.tag}.rank{engine.rank}.json").write_text(json.dumps(seen))
if step == args.total_steps:
    engine.save(out / f"final.{args.tag}.pt", model=model, optimizer=optimizer)
