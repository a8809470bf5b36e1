"""Outputs of ``trainfleet bench``: the console table, results.md, results.csv and two PNG plots."""
from __future__ import annotations

import csv
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from trainfleet.bench.runner import BenchResult
from trainfleet.engine.profiling import PHASES

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")


def machine() -> dict[str, Any]:
    """CPU model and flags, cores, torch version and GPUs of this machine."""
    info: dict[str, Any] = {"cpu": platform.processor() or "unknown", "flags": [], "cores": os.cpu_count(),
                            "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        info["cpu"] = model.group(1) if model else info["cpu"]
        info["flags"] = [f for f in FLAGS_OF_INTEREST if flags and f in flags.group(1).split()]
    except OSError:
        pass
    import torch

    info["torch"] = str(torch.__version__)
    gpus = "none"
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
        gpus = "; ".join(listing.splitlines()) or "none"
    info["gpus"] = gpus
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def rows(results: list[BenchResult], threads: dict[str, int]) -> list[dict[str, str]]:
    """One row per configuration, measured or skipped."""
    table = []
    for r in results:
        c = r.config
        row = {"strategy": c.strategy, "precision": c.precision, "workers": str(c.workers),
               "threads/worker": str(threads.get(c.label, "-"))}
        if r.skipped:
            row.update({"samples/s": "skipped", "notes": r.skipped})
            table.append(row)
            continue
        phases = r.phase_medians
        row.update({
            "samples/s": f"{r.median(r.samples_per_s):.1f}",
            "min-max": f"{min(r.samples_per_s):.1f}-{max(r.samples_per_s):.1f}",
            "step ms": f"{r.median(r.step_ms):.1f}",
            "data/fwd/bwd/comm/opt ms": "/".join(f"{phases[p]:.1f}" for p in PHASES),
            "peak MB/rank": f"{r.median(r.peak_mb):.0f}",
            "params+optim MB/rank": _fmt(r.median(r.state_mb), ".2f"),
            "state copy MB/rank": _fmt(r.median(r.copy_mb), ".2f"),
            "efficiency": _fmt(r.efficiency, ".2f"),
            "speedup vs 32": _fmt(r.speedup, ".2f"),
            "notes": "",
        })
        table.append(row)
    return table


COLUMNS = ["strategy", "precision", "workers", "threads/worker", "samples/s", "min-max", "step ms",
           "data/fwd/bwd/comm/opt ms", "peak MB/rank", "params+optim MB/rank", "state copy MB/rank", "efficiency",
           "speedup vs 32",
           "notes"]


def console_table(table: list[dict[str, str]]) -> str:
    """The table aligned for a terminal."""
    widths = {c: max(len(c), *(len(row.get(c, "")) for row in table)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
    lines += ["  ".join(row.get(c, "").ljust(widths[c]) for c in COLUMNS).rstrip() for row in table]
    return "\n".join(lines)


def write_markdown(path: Path, table: list[dict[str, str]], info: dict[str, Any], settings: dict[str, Any]) -> None:
    lines = ["# trainfleet bench", "",
             f"- machine: {info['cpu']} ({info['cores']} cores; flags {', '.join(info['flags']) or 'none'}); "
             f"GPUs: {info['gpus']}; torch {info['torch']}, python {info['python']}",
             "- settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()),
             "- figures are medians over interleaved rounds (min-max of samples/s beside them); a step ends "
             "when its slowest rank does. Phases are per rank: data (waiting for the batch), forward, "
             "backward, comm (gradient all-reduce; under ddp it overlaps backward), optimizer.",
             "- efficiency: samples/s over workers x the 1-worker samples/s of the same strategy "
             "(single when it has none); speedup: samples/s over the fp32 run of the same strategy and workers.",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.get(c, "") for c in COLUMNS) + " |" for row in table]
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, results: list[BenchResult], threads: dict[str, int]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["strategy", "precision", "workers", "threads_per_worker", "status", "samples_per_s",
                         "samples_per_s_min", "samples_per_s_max", "step_ms", *[f"{p}_ms" for p in PHASES],
                         "peak_mb_per_rank", "state_mb_per_rank", "copy_mb_per_rank", "efficiency", "speedup_vs_32",
                         "rounds", "reason"])
        for r in results:
            c = r.config
            head = [c.strategy, c.precision, c.workers, threads.get(c.label, "")]
            if r.skipped:
                writer.writerow(head + ["skipped"] + [""] * (10 + len(PHASES)) + [r.skipped])
                continue
            phases = r.phase_medians
            writer.writerow(head + ["ok", f"{r.median(r.samples_per_s):.3f}", f"{min(r.samples_per_s):.3f}",
                                    f"{max(r.samples_per_s):.3f}", f"{r.median(r.step_ms):.3f}",
                                    *[f"{phases[p]:.3f}" for p in PHASES], f"{r.median(r.peak_mb):.1f}",
                                    _fmt(r.median(r.state_mb), ".3f"), _fmt(r.median(r.copy_mb), ".3f"),
                                    _fmt(r.efficiency, ".4f"), _fmt(r.speedup, ".4f"), len(r.samples_per_s), ""])


def write_plots(out: Path, results: list[BenchResult]) -> list[Path]:
    """throughput.png (samples/s with min-max) and breakdown.png (stacked phases per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r.samples_per_s]
    labels = [r.config.label for r in measured]
    height = max(2.5, 0.45 * len(measured) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height))
    medians = [r.median(r.samples_per_s) for r in measured]
    errors = [[m - min(r.samples_per_s) for m, r in zip(medians, measured)],
              [max(r.samples_per_s) - m for m, r in zip(medians, measured)]]
    ax.barh(labels, medians, xerr=errors, color="#4c72b0", capsize=3)
    ax.set_xlabel("samples/s (median, min-max)")
    ax.set_title("Throughput by strategy / precision / workers")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, height))
    left = [0.0] * len(measured)
    colors = ["#8c8c8c", "#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for phase, color in zip(PHASES, colors):
        values = [r.phase_medians[phase] for r in measured]
        ax.barh(labels, values, left=left, color=color, label=phase)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("ms per step and rank (comm overlaps backward under ddp)")
    ax.set_title("Where a step's time goes")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "breakdown.png", dpi=120)
    plt.close(fig)
    return [out / "throughput.png", out / "breakdown.png"]
