"""Horovod and bf16 autocast through the engine, against the hand-written equivalents:

- horovod_vs_handwritten: samples/s of the engine's horovod against the Horovod tutorial
  loop (hvd.DistributedOptimizer + broadcasts), 2 workers (target >= 0.97);
- engine_horovod_vs_engine_ddp: samples/s of the two engine strategies (no target);
- amp_bf16_speedup_vs_handwritten: the bf16 autocast speedup over fp32 through the engine
  (precision bf16) against the same speedup of a hand-written torch.autocast loop, one
  process (target >= 0.95).
Skipped, with the reason printed, when Horovod is not installed.
"""
from __future__ import annotations

import argparse
import importlib.util

from benchmarks.common import Comparison, interleave, median_step


def horovod(rounds: int, steps: int, model: str) -> list[Comparison]:
    hvd = ["--gpus", "2", "--strategy", "horovod"]
    versus_hand = interleave(rounds, lambda: median_step("engine", hvd, steps, model)["samples_per_s"],
                             lambda: median_step("hvd_hand", hvd, steps, model)["samples_per_s"],
                             Comparison("horovod_vs_handwritten (samples/s)", 0.97, lower_is_better=False), warmup=0)
    versus_ddp = interleave(rounds, lambda: median_step("engine", hvd, steps, model)["samples_per_s"],
                            lambda: median_step("engine", ["--gpus", "2"], steps, model)["samples_per_s"],
                            Comparison("engine_horovod_vs_engine_ddp (samples/s)", None, lower_is_better=False),
                            warmup=0)
    return [versus_hand, versus_ddp]


def amp(rounds: int, steps: int, model: str) -> Comparison:
    one = ["--strategy", "single"]

    def engine_speedup() -> float:
        fp32 = median_step("engine", one, steps, model)["step"]
        return fp32 / median_step("engine", one + ["--precision", "bf16"], steps, model)["step"]

    def hand_speedup() -> float:
        fp32 = median_step("single_hand", one, steps, model)["step"]
        return fp32 / median_step("single_hand", one, steps, model, "--autocast", "bf16")["step"]

    return interleave(rounds, engine_speedup, hand_speedup,
                      Comparison("amp_bf16_speedup_vs_handwritten", 0.95, lower_is_better=False), warmup=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 8 steps")
    parser.add_argument("--smoke", action="store_true", help="1 round of 3 steps on lenet")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.model = 1, 3, "lenet"
    elif args.quick:
        args.rounds, args.steps = 3, 8
    if importlib.util.find_spec("horovod") is None:
        print("horovod_vs_handwritten: skipped (Horovod is not installed: run scripts/build-horovod.sh)")
        print("engine_horovod_vs_engine_ddp: skipped (Horovod is not installed)")
    else:
        for comparison in horovod(args.rounds, args.steps, args.model):
            print(comparison.line(), flush=True)
    print(amp(args.rounds, args.steps, args.model).line(), flush=True)


if __name__ == "__main__":
    main()
