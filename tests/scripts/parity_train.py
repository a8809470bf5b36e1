"""Trains LeNet on synthetic data through the engine; rank 0 writes losses and weights.

    parity_train.py OUT_DIR [--steps N] [--global-batch-size G] [--accumulate K]

(precision and strategy come from `launch`)

With ``--accumulate K`` each worker's batch is split into K micro-batches; the first K-1
backward passes run under ``engine.no_sync``. losses.json also records what the strategy did:
sharded blocks, the dtype a Linear computes in, forward calls per step (activation
checkpointing runs a block's forward again in backward), and the collectives of the training
loop by kind, per step, as torch's Flight Recorder saw them (gloo records them too): so
``no_sync`` is shown to skip the gradient reduction, not just to give the same numbers.
"""
import argparse
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

import trainfleet
from trainfleet.datasets import build_dataset
from trainfleet.models import build_model

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--global-batch-size", type=int, default=16)
parser.add_argument("--accumulate", type=int, default=1)
parser.add_argument("--batchnorm", action="store_true", help="a BatchNorm2d after LeNet's first convolution")
args = parser.parse_args()
os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "100000")  # before the process group: the Flight Recorder


def collectives() -> Counter:
    """Collectives this rank issued so far, by kind ("allreduce", "reduce_scatter", ...)."""
    from torch._C._distributed_c10d import _dump_fr_trace

    entries = pickle.loads(_dump_fr_trace(True, True)).get("entries", [])
    return Counter(e["profiling_name"].split(":", 1)[-1] for e in entries if not e.get("is_p2p"))


engine = trainfleet.Engine(seed=1)
dataset = build_dataset("synthetic", num_samples=64, shape=(1, 16, 16), num_classes=4)
model = build_model("lenet", num_classes=4, in_channels=1)
if args.batchnorm:
    model.features.insert(1, torch.nn.BatchNorm2d(6))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model, optimizer = engine.setup(model, optimizer)
loader = engine.dataloader(dataset, global_batch_size=args.global_batch_size)

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 on GPUs too
seen = {"forward_calls": 0, "compute_dtype": None, "synced_backwards": 0}
head = engine.unwrap(model).classifier[1]


def on_forward(module, inputs):
    seen["forward_calls"] += 1
    seen["compute_dtype"] = str(module.weight.dtype)


head.register_forward_pre_hook(on_forward)
losses, step = [], 0
before = collectives() if engine.world_size > 1 else Counter()
while step < args.steps:
    for x, y in loader:
        total = 0.0
        for i, (xs, ys) in enumerate(zip(x.chunk(args.accumulate), y.chunk(args.accumulate))):
            last = i == args.accumulate - 1
            with engine.no_sync(model) if not last else torch.enable_grad():
                with engine.autocast():
                    loss = F.cross_entropy(model(xs), ys) / args.accumulate
                engine.backward(loss)
                seen["synced_backwards"] += int(getattr(model, "require_backward_grad_sync", True))
            total += loss.detach().float()
        engine.step(optimizer)
        losses.append(engine.all_reduce(total, op="mean").item())
        step += 1
        if step == args.steps:
            break

loop_collectives = (collectives() - before) if engine.world_size > 1 else Counter()
out = Path(args.out)
engine.save(out / "final.pt", model=model)
param = next(engine.unwrap(model).parameters())
if engine.is_main:
    (out / "losses.json").write_text(json.dumps({
        "losses": losses, "world_size": engine.world_size, "strategy": engine.strategy.name,
        "sharded_blocks": getattr(engine.strategy, "blocks", None), "param_type": type(param).__name__,
        "param_dtype": str(param.dtype), "compute_dtype": seen["compute_dtype"],
        "forward_calls_per_step": seen["forward_calls"] / args.steps, "precision": engine.precision.name,
        "synced_backwards_per_step": seen["synced_backwards"] / args.steps, "model_type": type(model).__name__,
        "collectives_per_step": {k: v / args.steps for k, v in loop_collectives.items()},
        "device": str(engine.device), "synced_batchnorms": getattr(engine.strategy, "synced_batchnorms", 0),
        "loss_scale": engine.precision.scaler.get_scale() if getattr(engine.precision, "scaler", None) else None}))
