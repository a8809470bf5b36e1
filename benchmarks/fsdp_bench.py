"""FSDP benchmarks; every comparison is measured side by side in one run:

- fsdp_memory_vs_ddp: each rank's peak memory while training (3 Adam steps) under fsdp(4) against
  ddp(4), on a model of >= 50 M parameters (3.2 M under --smoke): the peak resident set on CPU (the
  allocator's peak on CUDA) above what the process held before the model existed, so gathered
  blocks, gradients, optimizer state and activations count (target <= 0.3);
- fsdp_engine_step_vs_handwritten: the engine's fsdp step against a hand-written FSDP2 loop
  (fully_shard per block, then the root), alternating rounds in the same 2 workers (target <= 1.03);
- fsdp_dcp_save_vs_dcp_save: engine.save of a sharded folder against dcp.save called by hand on the
  same state, throughput ratio (target >= 0.95), and the time an asynchronous save blocks against
  a synchronous one (target <= 0.1);
- fsdp_reshard_load_vs_same_world: 2 workers loading a folder written by 4 against one written by 2
  (target <= 1.2).

    python -m benchmarks.fsdp_bench [--rounds R] [--quick] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import shutil

from benchmarks.common import BIN, PROBES, Comparison, cleans_up, run_probe, scratch

PROBE = str(PROBES / "fsdp_probe.py")
BIG = ["--width", "2048", "--depth", "6"]  # 6 blocks of 2 x (2048 x 2048 + 2048): 50.4 M parameters
SMALL = ["--width", "512", "--depth", "6"]
# glibc serves every allocation above 128 KiB from its own mapping and unmaps it when freed (a fixed
# threshold stops glibc raising it as it goes): the resident set then follows the live tensors
# instead of keeping freed heap (without it, the same fsdp run read 940-1074 MB per rank, 1005 on
# average, for 480 with it, the model's freed full-size copy still counted as resident).
MEASURABLE_HEAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # --smoke: 3.2 M parameters, the same sharding (bytes / 4)


def _probe(out, gpus: int, modes: str, *args: str, strategy: str = "fsdp") -> dict[str, dict]:
    """Run the probe's ``modes`` (comma-separated) in one launch; their results by mode."""
    run_probe([str(BIN / "launch"), "--strategy", strategy, "--gpus", str(gpus), PROBE, str(out), modes, *args], out,
              timeout=900, env=MEASURABLE_HEAP)
    return {mode: json.loads((out / f"{mode}.json").read_text()) for mode in modes.split(",")}


def memory(fsdp: dict, ddp: dict) -> Comparison:
    comparison = Comparison("fsdp_memory_vs_ddp", 0.3, counted=True)
    for result, side in ((fsdp, comparison.ours), (ddp, comparison.peer)):
        side.append(max(r["peak"] for r in result["per_rank"]) / 2**20)
    shards = max(r["params"] + r["optimizer"] for r in fsdp["per_rank"]) / 2**20
    print(f"  model: {fsdp['parameters'] / 1e6:.1f} M parameters; peak MB per rank while training "
          f"({fsdp['per_rank'][0]['measured']}), fsdp4 {comparison.ours[0]:.1f} vs ddp4 {comparison.peer[0]:.1f} "
          f"(fsdp4's own shards of params + Adam state: {shards:.1f} MB)")
    return comparison


def step(result: dict) -> Comparison:
    return Comparison("fsdp_engine_step_vs_handwritten", 1.03, ours=result["ours"], peer=result["peer"])


def save(result: dict) -> list[Comparison]:
    # throughput ratio: the same bytes, so peer time / our time
    throughput = Comparison("fsdp_dcp_save_vs_dcp_save", 0.95, lower_is_better=False,
                            ours=[1 / t for t in result["ours"]], peer=[1 / t for t in result["peer"]])
    blocking = Comparison("fsdp_async_save_blocking_vs_sync", 0.1, ours=result["async_blocking"],
                          peer=result["ours"])  # the synchronous sharded saves of the same rounds
    return [throughput, blocking]


def load(result: dict) -> Comparison:
    return Comparison("fsdp_reshard_load_vs_same_world", 1.2, ours=result["a"], peer=result["b"])


def full(out, folder, rounds: int, steps: int) -> list[Comparison]:
    """A launch per measurement: the 50 M-parameter model for memory, width 1024 for the rest."""
    fsdp, ddp = (_probe(out, 4, "memory", *BIG, "--batch", "4", strategy=name)["memory"] for name in ("fsdp", "ddp"))
    timed = ["--rounds", str(rounds), "--width", "1024"]
    stepped = _probe(out, 2, "step", *timed, "--steps", str(steps))["step"]
    saved = _probe(out, 2, "save", *timed, "--scratch", str(folder / "save"))["save"]
    for gpus in (4, 2):
        _probe(out, gpus, "write", "--width", "1024", "--write-to", str(folder / f"by{gpus}"))
    # a load takes ~40 ms: 3x the rounds, as the spread between pairs is a few ms
    loaded = _probe(out, 2, "load", "--rounds", str(3 * rounds), "--width", "1024", "--ckpt-a", str(folder / "by4"),
                    "--ckpt-b", str(folder / "by2"))["load"]
    return [memory(fsdp, ddp), step(stepped), *save(saved), load(loaded)]


def smoke(out, folder) -> list[Comparison]:
    """--smoke: every comparison once on the 3.2 M-parameter model, in 3 launches instead of 7
    (the 4-worker fsdp launch also writes the folder the 2-worker one loads)."""
    by4, by2 = str(folder / "by4"), str(folder / "by2")
    fsdp = _probe(out, 4, "memory,write", *SMALL, "--batch", "4", "--write-to", by4)["memory"]
    ddp = _probe(out, 4, "memory", *SMALL, "--batch", "4", strategy="ddp")["memory"]
    two = _probe(out, 2, "step,save,write,load", *SMALL, "--rounds", "1", "--steps", "2", "--scratch",
                 str(folder / "save"), "--write-to", by2, "--ckpt-a", by4, "--ckpt-b", by2)
    return [memory(fsdp, ddp), step(two["step"]), *save(two["save"]), load(two["load"])]


@cleans_up
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--smoke", action="store_true", help="1 round, small steps")
    args = parser.parse_args(argv)
    rounds, steps = (3 if args.quick else args.rounds), 10
    out, folder = scratch(), scratch()
    try:
        comparisons = smoke(out, folder) if args.smoke else full(out, folder, rounds, steps)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    for comparison in comparisons:
        print(comparison.line())


if __name__ == "__main__":
    main()
