"""A ~100 MB model for checkpoint benchmarks; run under launch it saves a checkpoint at its world size.

    big_model.py OUT_FILE
"""
import sys

import torch

import trainfleet


def build(mb: int = 100) -> torch.nn.Module:
    torch.manual_seed(0)
    width = 2048
    layers = max(1, mb * 2**20 // (4 * width * width))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


if __name__ == "__main__":
    engine = trainfleet.Engine()
    model = engine.setup(build())
    engine.save(sys.argv[1], model=model)
