"""launch_ready_vs_torchrun: command start to every rank past init + barrier, 2 gloo workers.

The launcher imports torch once and forks its workers; torchrun's workers each import
torch themselves. Target: <= 0.65 of torchrun's time.
"""
from __future__ import annotations

import shutil

from benchmarks.common import (BIN, PROBES, Comparison, cleans_up, interleave, now, read_json_files, rounds_from_args,
                               run_probe, scratch)

PROBE = str(PROBES / "ready.py")


def _time_to_ready(cmd_prefix: list[str]) -> float:
    out = scratch()
    start = now()
    run_probe([*cmd_prefix, PROBE, str(out)], out)
    ready = max(record["t"] for record in read_json_files(out, "ready*.json"))
    shutil.rmtree(out)
    return ready - start


def measure(rounds: int) -> Comparison:
    ours = lambda: _time_to_ready([str(BIN / "launch"), "--gpus", "2"])
    peer = lambda: _time_to_ready([str(BIN / "torchrun"), "--nproc-per-node", "2"])
    return interleave(rounds, ours, peer, Comparison("launch_ready_vs_torchrun", target=0.65))


@cleans_up
def main(argv: list[str] | None = None) -> None:
    rounds = rounds_from_args(__doc__, argv, rounds=7, quick=3)
    print(measure(rounds).line(), flush=True)


if __name__ == "__main__":
    main()
