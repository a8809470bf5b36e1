"""The engine's DDP step against hand-written loops, 2 CPU workers, same model and data:

- engine_ddp_vs_handwritten: step time against init_process_group + DDP +
  DistributedSampler (target <= 1.02);
- engine_accum_vs_no_sync: a step of 4 accumulated micro-batches (engine.no_sync)
  against the same loop with DDP's no_sync written by hand (target <= 1.03).

Both loops run in the same two workers (step_probe.py ``engine+ddp_hand``), one step of each in
turn, the first of each pair alternating: a pair of step times shares its process, threads and
moment, so the machine's drift between separate runs (a few % here) stays out of the ratio.
Each round is one run; its two median step times are one pair.
"""
from __future__ import annotations

from benchmarks.common import Comparison, cleans_up, paired_steps, step_benchmark_args

TWO = ["--gpus", "2"]


def measure(rounds: int, steps: int, model: str) -> list[Comparison]:
    plain = paired_steps(Comparison("engine_ddp_vs_handwritten", target=1.02), rounds, "engine+ddp_hand", TWO,
                         steps, model)
    accumulated = paired_steps(Comparison("engine_accum_vs_no_sync", target=1.03), rounds, "engine+ddp_hand",
                               TWO, steps, model, "--accumulate", "4")
    return [plain, accumulated]


@cleans_up
def main(argv: list[str] | None = None) -> None:
    args = step_benchmark_args(__doc__, argv, rounds=5, steps=20, quick=(2, 4))
    for comparison in measure(args.rounds, args.steps, args.model):
        print(comparison.line(), flush=True)


if __name__ == "__main__":
    main()
