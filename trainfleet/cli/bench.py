"""``trainfleet bench``: strategies x precisions x worker counts on the user's model or script."""
from __future__ import annotations

import argparse
from typing import Any

from trainfleet.cli.common import csv


def _run_bench(ns: argparse.Namespace) -> int:
    from trainfleet.bench.command import bench

    script_args = ns.script_args[1:] if ns.script_args[:1] == ["--"] else ns.script_args
    bench(ns.strategies, ns.precisions, ns.gpus, ns.out, ns.steps, ns.warmup, ns.rounds, ns.model, ns.dataset,
          ns.batch_size, ns.script, script_args, progress=not ns.no_progress)
    return 0


def add_bench_command(sub: Any) -> None:
    """``trainfleet bench``: strategies x precisions x worker counts on your model or script."""
    bench = sub.add_parser("bench", help="compare the parallel strategies and precisions")
    add = bench.add_argument
    add("--model", default="resnet18", help="a registry model (default resnet18)")
    add("--dataset", default="synthetic", help="a registry dataset (default synthetic)")
    add("--script", help="benchmark your own training script (it must use trainfleet.Engine) instead")
    add("--strategies", type=csv(str), default=["single", "ddp"],
        help="comma list of single, dp, ddp, fsdp, horovod (default single,ddp)")
    add("--precisions", type=csv(str), default=["32"], help="comma list, e.g. 32,bf16 (default 32)")
    add("--gpus", type=csv(int), default=[1, 2], help="worker counts, comma list (default 1,2)")
    add("--steps", type=int, default=20, help="timed steps per run (default 20)")
    add("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    add("--rounds", type=int, default=3, help="interleaved repetitions (default 3)")
    add("--batch-size", type=int, default=32, help="per worker (built-in model only; default 32)")
    add("--out", default="bench", help="folder for results.md/csv and the plots (default ./bench)")
    add("--no-progress", action="store_true", help="no progress bar")
    add("script_args", nargs=argparse.REMAINDER, help="arguments for --script (after --)")
    bench.set_defaults(func=_run_bench)
