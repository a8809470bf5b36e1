"""A complete trainfleet training script: the same file runs on a laptop or many nodes.

    python examples/train.py                      # one process
    launch --gpus 2 examples/train.py             # 2 DDP workers (CPU over gloo without GPUs)
    launch --debug examples/train.py              # in-process, for a debugger
"""
import argparse

import torch
import torch.nn.functional as F

import trainfleet
from trainfleet.datasets import build_dataset
from trainfleet.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--save", default=None, help="checkpoint path written at the end")
    args = parser.parse_args()

    engine = trainfleet.Engine(seed=0)
    engine.print(f"strategy={engine.strategy.name} world_size={engine.world_size} device={engine.device}")

    dataset = build_dataset("synthetic", "train", num_samples=args.samples, shape=(1, 28, 28), num_classes=10)
    model = build_model("lenet", num_classes=10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = engine.setup(model, optimizer)
    loader = engine.dataloader(dataset, global_batch_size=args.global_batch_size)

    for epoch in range(args.epochs):
        model.train()
        for step, (x, y) in enumerate(loader):
            with engine.autocast():
                loss = F.cross_entropy(model(x), y)
            engine.backward(loss)
            engine.step(optimizer)
            loss = engine.all_reduce(loss.detach(), op="mean")
            if step % 5 == 0:
                engine.print(f"epoch {epoch} step {step} loss {loss.item():.4f}")
    if args.save:
        engine.save(args.save, model=model, optimizer=optimizer, dataloader=loader, epoch=args.epochs)
        engine.print(f"saved {args.save}")


if __name__ == "__main__":
    main()
