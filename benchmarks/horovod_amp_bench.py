"""Horovod and bf16 autocast through the engine, against the hand-written equivalents:

- horovod_vs_handwritten: samples/s of the engine's horovod against the Horovod tutorial
  loop (hvd.DistributedOptimizer + broadcasts), 2 workers under launch, both loops in the same
  workers taking turns step by step (target >= 0.97);
- engine_horovod_vs_engine_ddp: samples/s of the two engine strategies (no target);
- amp_bf16_speedup_vs_handwritten: the bf16 autocast speedup over fp32 through the engine
  (Engine(precision="bf16")) against the same speedup of a hand-written torch.autocast
  loop, in one process on the same model and batch, the four loops taking turns step by step
  (target >= 0.95). Skipped, with the CPU's
  flags, where bf16 is emulated (no AVX-512 BF16/AMX): a step there is ~45x slower than fp32.
Horovod's lines are skipped, with the reason, when Horovod is not installed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import statistics
import time

from benchmarks.common import Comparison, cleans_up, median_step, step_benchmark_args
from trainfleet.utils.cpu import bf16_emulated


def horovod(rounds: int, steps: int, model: str) -> list[Comparison]:
    """Per round: one run of the engine's and the tutorial's loops in the same workers (a step of
    each in turn), and one run each of the engine's horovod and ddp; ``rounds`` rounds, never more
    (rounds added only while inconclusive would bias the verdict)."""
    hvd, ddp = ["--gpus", "2", "--strategy", "horovod"], ["--gpus", "2"]
    versus_hand = Comparison("horovod_vs_handwritten (samples/s)", 0.97, lower_is_better=False)
    versus_ddp = Comparison("engine_horovod_vs_engine_ddp (samples/s)", None, lower_is_better=False)
    for index in range(rounds):
        order = ["pair", "engine", "ddp"] if index % 2 == 0 else ["ddp", "engine", "pair"]
        got = {}
        for which in order:
            mode, args = {"pair": ("engine+hvd_hand", hvd), "engine": ("engine", hvd), "ddp": ("engine", ddp)}[which]
            got[which] = median_step(mode, args, steps, model)
        paired = got["pair"]
        versus_hand.ours.append(paired["samples_per_step"] / paired["steps"]["engine"])
        versus_hand.peer.append(paired["samples_per_step"] / paired["steps"]["hvd_hand"])
        versus_ddp.ours.append(got["engine"]["samples_per_s"])
        versus_ddp.peer.append(got["ddp"]["samples_per_s"])
    return [versus_hand, versus_ddp]


def _interleaved_step_times(loops: dict, steps: int, first: bool) -> dict[str, float]:
    """Median step time of each loop, the loops taking turns step by step (their order reversed
    every step): each loop's steps meet the machine at the same moments as the others'."""
    names = list(loops) if first else list(reversed(loops))
    for name in names:
        loops[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(steps):
        for name in names if index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            loops[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def amp(rounds: int, steps: int, model_name: str) -> Comparison:
    import torch
    import torch.nn.functional as F

    from trainfleet.engine.engine import Engine
    from trainfleet.models import build_model

    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def engine_loop(precision: str):
        engine = Engine(strategy="single", precision=precision)
        model = build_model(model_name)
        model, optimizer = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.01))

        def step() -> None:
            with engine.autocast():
                loss = F.cross_entropy(model(x), y)
            engine.backward(loss)
            engine.step(optimizer)
        return step

    def hand_loop(bf16: bool):
        model = build_model(model_name)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return step

    loops = {"e32": engine_loop("32"), "ebf16": engine_loop("bf16"), "h32": hand_loop(False), "hbf16": hand_loop(True)}
    result = Comparison("amp_bf16_speedup_vs_handwritten", 0.95, lower_is_better=False)
    for index in range(rounds):
        t = _interleaved_step_times(loops, steps, first=index % 2 == 0)
        result.ours.append(t["e32"] / t["ebf16"])
        result.peer.append(t["h32"] / t["hbf16"])
    return result


@cleans_up
def main(argv: list[str] | None = None) -> None:
    args = step_benchmark_args(__doc__, argv, rounds=5, steps=15, quick=(2, 4))
    if importlib.util.find_spec("horovod") is None:
        print("horovod_vs_handwritten: skipped (Horovod is not installed: run scripts/build-horovod.sh)")
        print("engine_horovod_vs_engine_ddp: skipped (Horovod is not installed)")
    else:
        for comparison in horovod(args.rounds, args.steps, args.model):
            print(comparison.line(), flush=True)
    emulated = bf16_emulated()
    if emulated:
        print(f"amp_bf16_speedup_vs_handwritten: skipped ({emulated})", flush=True)
    else:
        print(amp(args.rounds, args.steps, args.model).line(), flush=True)


if __name__ == "__main__":
    main()
