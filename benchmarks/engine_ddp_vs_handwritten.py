"""The engine's DDP step against hand-written loops, 2 CPU workers, same model and data:

- engine_ddp_vs_handwritten: step time against init_process_group + DDP +
  DistributedSampler (target <= 1.02);
- engine_accum_vs_no_sync: a step of 4 accumulated micro-batches (engine.no_sync)
  against the same loop with DDP's no_sync written by hand (target <= 1.03).
Interleaved rounds; the median step time of each round is one sample.
"""
from __future__ import annotations

from benchmarks.common import Comparison, cleans_up, interleave, median_step, step_benchmark_args

TWO = ["--gpus", "2"]


def measure(rounds: int, steps: int, model: str) -> list[Comparison]:
    plain = interleave(rounds, lambda: median_step("engine", TWO, steps, model)["step"],
                       lambda: median_step("ddp_hand", TWO, steps, model)["step"],
                       Comparison("engine_ddp_vs_handwritten", target=1.02), warmup=0)
    accum = ["--accumulate", "4"]
    accumulated = interleave(rounds, lambda: median_step("engine", TWO, steps, model, *accum)["step"],
                             lambda: median_step("ddp_hand", TWO, steps, model, *accum)["step"],
                             Comparison("engine_accum_vs_no_sync", target=1.03), warmup=0)
    return [plain, accumulated]


@cleans_up
def main(argv: list[str] | None = None) -> None:
    args = step_benchmark_args(__doc__, argv, rounds=5, steps=20, quick=(2, 4))
    for comparison in measure(args.rounds, args.steps, args.model):
        print(comparison.line(), flush=True)


if __name__ == "__main__":
    main()
