"""FSDP benchmarks; every comparison is measured side by side in one run:

- fsdp_memory_vs_ddp: parameter + optimizer-state bytes per rank under fsdp(4) against ddp(4) on a
  model of >= 50 M parameters (3.2 M under --smoke), after one Adam step (target <= 0.3);
- fsdp_engine_step_vs_handwritten: the engine's fsdp step against a hand-written FSDP2 loop
  (fully_shard per block, then the root), alternating rounds in the same 2 workers (target <= 1.03);
- fsdp_dcp_save_vs_dcp_save: engine.save of a sharded folder against dcp.save called by hand on the
  same state, throughput ratio (target >= 0.95), and the time an asynchronous save blocks against
  a synchronous one (informational);
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
SMALL = ["--width", "512", "--depth", "6"]  # --smoke: 3.2 M parameters, the same sharding (bytes / 4)


def _probe(out, gpus: int, modes: str, *args: str, strategy: str = "fsdp") -> dict[str, dict]:
    """Run the probe's ``modes`` (comma-separated) in one launch; their results by mode."""
    run_probe([str(BIN / "launch"), "--strategy", strategy, "--gpus", str(gpus), PROBE, str(out), modes, *args], out,
              timeout=900)
    return {mode: json.loads((out / f"{mode}.json").read_text()) for mode in modes.split(",")}


def memory(fsdp: dict, ddp: dict) -> Comparison:
    comparison = Comparison("fsdp_memory_vs_ddp", 0.3, counted=True)
    for result, side in ((fsdp, comparison.ours), (ddp, comparison.peer)):
        side.append(max(r["params"] + r["optimizer"] for r in result["per_rank"]) / 2**20)
    print(f"  model: {fsdp['parameters'] / 1e6:.1f} M parameters; MB per rank (params + Adam state), "
          f"fsdp4 {comparison.ours[0]:.1f} vs ddp4 {comparison.peer[0]:.1f}")
    return comparison


def step(result: dict) -> Comparison:
    return Comparison("fsdp_engine_step_vs_handwritten", 1.03, ours=result["ours"], peer=result["peer"])


def save(result: dict) -> list[Comparison]:
    # throughput ratio: the same bytes, so peer time / our time
    throughput = Comparison("fsdp_dcp_save_vs_dcp_save", 0.95, lower_is_better=False,
                            ours=[1 / t for t in result["ours"]], peer=[1 / t for t in result["peer"]])
    blocking = Comparison("fsdp_async_save_blocking_vs_sync", None, ours=result["async_blocking"],
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
    loaded = _probe(out, 2, "load", *timed, "--ckpt-a", str(folder / "by4"), "--ckpt-b", str(folder / "by2"))["load"]
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
