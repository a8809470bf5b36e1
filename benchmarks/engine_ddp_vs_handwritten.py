"""engine_ddp_vs_handwritten: step time of the engine's ddp against a hand-written DDP loop.

Both run under the same launcher with 2 CPU workers on the same model and data, in
interleaved rounds; the median step time of each round is one sample. Target <= 1.02.
"""
from __future__ import annotations

import argparse

from benchmarks.common import Comparison, interleave, median_step


def measure(rounds: int, steps: int, model: str) -> Comparison:
    two = ["--gpus", "2"]
    return interleave(rounds, lambda: median_step("engine", two, steps, model)["step"],
                      lambda: median_step("ddp_hand", two, steps, model)["step"],
                      Comparison("engine_ddp_vs_handwritten", target=1.02), warmup=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 10 steps")
    parser.add_argument("--smoke", action="store_true", help="1 round of 3 steps on lenet")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.model = 1, 3, "lenet"
    elif args.quick:
        args.rounds, args.steps = 3, 10
    print(measure(args.rounds, args.steps, args.model).line(), flush=True)


if __name__ == "__main__":
    main()
