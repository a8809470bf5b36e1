"""Run every benchmark of trainfleet against its peers and print one verdict line each.

    python benchmarks/run.py [--quick] [--smoke] [--only NAME]

--quick (under 3 minutes) and --smoke (under 1) run the benchmarks of one host with fewer
rounds; those that start a cluster's jobs, ssh hosts or fault trials (LONG) take minutes a
round and run in full runs, or by name with --only.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCHMARKS = ["launch_ready", "engine_ddp_vs_handwritten", "ckpt_bench", "horovod_amp_bench", "fsdp_bench",
              "diagnosis_bench", "slurm_startup", "hosts_startup", "elastic_recovery", "heartbeat_soak"]
LONG = ["slurm_startup", "hosts_startup", "elastic_recovery", "heartbeat_soak"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a few minutes in all)")
    parser.add_argument("--smoke", action="store_true", help="one round each: checks that they run")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, help="run only these")
    args = parser.parse_args()
    flags = ["--smoke"] if args.smoke else (["--quick"] if args.quick else [])
    names = args.only or [name for name in BENCHMARKS if not (flags and name in LONG)]
    if not args.only and flags:
        print(f"not in {flags[0]}: {', '.join(LONG)} (minutes a round; --only NAME runs one)", flush=True)
    started_all = time.perf_counter()
    for name in names:
        started = time.perf_counter()
        importlib.import_module(f"benchmarks.{name}").main(flags)
        print(f"  ({name} took {time.perf_counter() - started:.0f}s)", flush=True)
    print(f"all took {time.perf_counter() - started_all:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
