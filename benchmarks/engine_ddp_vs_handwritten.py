"""engine_ddp_vs_handwritten: step time of the engine's ddp against a hand-written DDP loop.

Both run under the same launcher with 2 CPU workers on the same model and data, in
interleaved rounds; the median step time of each round is one sample. Target <= 1.02.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics

from benchmarks.common import BIN, PROBES, Comparison, interleave, run_probe, scratch

PROBE = str(PROBES / "ddp_step.py")


def _median_step(mode: str, steps: int, model: str) -> float:
    out = scratch()
    run_probe([str(BIN / "launch"), "--gpus", "2", PROBE, str(out), mode, "--steps", str(steps),
               "--model", model], out)
    times = json.loads((out / f"{mode}.json").read_text())["step_times"]
    shutil.rmtree(out)
    return statistics.median(times)


def measure(rounds: int, steps: int, model: str) -> Comparison:
    return interleave(rounds, lambda: _median_step("engine", steps, model),
                      lambda: _median_step("handwritten", steps, model),
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
