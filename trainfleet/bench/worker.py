"""The built-in benchmark script: a registry model on a registry dataset, through the engine.

    launch ... -m trainfleet.bench.worker --model resnet18 --dataset synthetic --batch-size 32

Timing is done by the engine itself (switched on by the runner), which ends the run after
the requested steps, so this is an ordinary training loop.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import trainfleet
from trainfleet.datasets import build_dataset, dataset_info
from trainfleet.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-dir")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    args = parser.parse_args()

    engine = trainfleet.Engine(seed=0)
    options = {"num_samples": 100_000} if args.dataset == "synthetic" else {"data_dir": args.data_dir}
    dataset = build_dataset(args.dataset, "train", **options)
    info = dataset_info(dataset)
    model = build_model(args.model, num_classes=info["num_classes"] or 10, input_shape=info["input_shape"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model, optimizer = engine.setup(model, optimizer)
    loader = engine.dataloader(dataset, batch_size=args.batch_size)
    while True:  # the engine ends the run once the benchmark's steps are done
        for x, y in loader:
            with engine.autocast():
                loss = F.cross_entropy(model(x), y)
            engine.backward(loss)
            engine.step(optimizer)


if __name__ == "__main__":
    main()
