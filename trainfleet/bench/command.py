"""``trainfleet bench``: plan, run through the launcher, report."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from trainfleet.bench import report, runner
from trainfleet.launcher.devices import visible_cuda_devices
from trainfleet.utils.errors import UsageError


def bench(strategies: list[str], precisions: list[str], workers: list[int], out: str, steps: int = 20,
          warmup: int = 3, rounds: int = 3, model: str = "resnet18", dataset: str = "synthetic",
          batch_size: int = 32, script: str | None = None, script_args: list[str] | None = None,
          progress: bool = True) -> list[runner.BenchResult]:
    """Compare strategies x precisions x worker counts on a model (or the user's script).

    Returns:
        Every configuration's result; skipped ones carry their reason.
    """
    if steps < 1 or rounds < 1 or warmup < 0:
        raise UsageError(f"--steps {steps}, --rounds {rounds}, --warmup {warmup}: expected steps and "
                         "rounds >= 1 and warmup >= 0.")
    if script is not None and not Path(script).is_file():
        raise UsageError(f"--script {script!r} was not found.", "give the path of a training script that uses "
                         "trainfleet.Engine (its dataloader, backward and step).")
    target = [script, *(script_args or [])] if script else [
        "-m", "trainfleet.bench.worker", "--model", model, "--dataset", dataset, "--batch-size", str(batch_size)]
    results = runner.plan(strategies, precisions, workers, visible_cuda_devices(),
                          importlib.util.find_spec("horovod") is not None)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for skipped in (r for r in results if r.skipped):
        print(f"skipping {skipped.config.label}: {skipped.skipped}", file=sys.stderr)
    runner.run_bench(results, target, steps, warmup, rounds, out_dir / "logs", progress=progress)
    threads = runner.threads_note(results)
    table = report.rows(results, threads)
    print(report.console_table(table))
    settings: dict[str, Any] = {"target": script or f"{model} on {dataset}", "steps": steps, "warm-up": warmup,
                                "rounds": rounds, "batch/worker": batch_size if not script else "script's"}
    report.write_markdown(out_dir / "results.md", table, report.machine(), settings)
    report.write_csv(out_dir / "results.csv", results, threads)
    report.write_plots(out_dir, results)
    names = ", ".join(str(out_dir / n) for n in ("results.md", "results.csv", "throughput.png", "breakdown.png"))
    print(f"wrote {names}")
    return results
