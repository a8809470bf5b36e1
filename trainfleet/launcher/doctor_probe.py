"""The all-reduce `trainfleet doctor` runs across every rank of the requested layout."""
import sys
import time

import torch

import trainfleet


def main() -> int:
    engine = trainfleet.Engine(seed=0)
    start = time.perf_counter()
    total = engine.all_reduce(torch.ones(1), op="sum").item()
    elapsed_ms = 1000 * (time.perf_counter() - start)
    if total != engine.world_size:
        print(f"doctor: all-reduce on rank {engine.rank} gave {total}, expected {engine.world_size}", flush=True)
        return 1
    engine.print(f"doctor: [ok] all-reduce over {engine.world_size} ranks ({engine.strategy.name}, "
                 f"{engine.device}) in {elapsed_ms:.1f} ms")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
