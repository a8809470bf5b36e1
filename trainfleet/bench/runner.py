"""Plan, run and aggregate a strategy benchmark through the real launcher.

Each configuration (strategy x precision x workers) is a ``launch`` of the target with
the engine's step timer switched on (the worker contract's bench variables); the engine times
the steps. Rounds are interleaved
(A B C, A B C, ...) because these machines are noisy, and each figure is the median
over rounds with its min-max.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from trainfleet.engine import contract
from trainfleet.engine.profiling import PHASES
from trainfleet.launcher.workers import threads_per_worker
from trainfleet.utils.errors import UsageError


@dataclass(frozen=True)
class BenchConfig:
    """One configuration to measure."""

    strategy: str
    precision: str
    workers: int

    @property
    def processes(self) -> int:
        return 1 if self.strategy in ("single", "dp") else self.workers

    @property
    def label(self) -> str:
        return f"{self.strategy}/{self.precision}/x{self.workers}"


@dataclass
class BenchResult:
    """Rounds measured for one configuration, or the reason it was skipped."""

    config: BenchConfig
    skipped: str | None = None
    samples_per_s: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    phases_ms: list[dict[str, float]] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    state_mb: list[float] = field(default_factory=list)
    copy_mb: list[float] = field(default_factory=list)  # the state copy in-place recovery and rollback keep
    efficiency: float | None = None
    speedup: float | None = None

    def median(self, values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    @property
    def phase_medians(self) -> dict[str, float]:
        return {p: self.median([r[p] for r in self.phases_ms]) for p in PHASES}


def skip_reason(config: BenchConfig, cuda_devices: int, horovod_installed: bool) -> str | None:
    """Why a configuration cannot run on this machine, or None."""
    if config.strategy == "single" and config.workers > 1:
        return "single runs one process on one device"
    if config.strategy == "dp" and config.workers > 1 and cuda_devices < config.workers:
        return f"dp replicates over GPUs in one process; this machine has {cuda_devices} CUDA devices"
    if config.strategy == "horovod" and not horovod_installed:
        return "Horovod is not installed (scripts/build-horovod.sh)"
    if cuda_devices and config.workers > cuda_devices:
        return f"{config.workers} workers but {cuda_devices} CUDA devices"
    if not cuda_devices and config.precision.startswith("bf16"):
        from trainfleet.utils.cpu import bf16_emulated

        return bf16_emulated()
    return None


def plan(strategies: list[str], precisions: list[str], workers: list[int], cuda_devices: int,
         horovod_installed: bool) -> list[BenchResult]:
    """Every configuration in order, each either runnable or carrying its skip reason."""
    from trainfleet.engine.registry import PRECISIONS, STRATEGIES

    for name in strategies:
        if name not in STRATEGIES:
            raise UsageError(STRATEGIES.unknown_message(name, STRATEGIES.names()))
    for name in precisions:
        if name not in PRECISIONS:
            raise UsageError(PRECISIONS.unknown_message(name, PRECISIONS.names()))
    if not workers or min(workers) < 1:
        raise UsageError(f"--gpus {workers}: expected worker counts of at least 1, e.g. --gpus 1,2.")
    results = []
    for strategy in strategies:
        for precision in precisions:
            for count in workers:
                config = BenchConfig(strategy, precision, count)
                results.append(BenchResult(config, skip_reason(config, cuda_devices, horovod_installed)))
    return results


def _aggregate(records: list[dict]) -> tuple[float, float, dict[str, float], float, float, float]:
    """(samples/s, step ms, phase ms, peak MB, params+optimizer MB, state copy MB) of one run; MB: the
    largest rank's."""
    steps = min(len(r["steps"]) for r in records)
    if steps == 0:
        raise RuntimeError("the run recorded no timed step; raise --steps or check the script")
    step_times, samples = [], []
    for i in range(steps):  # a step ends when its slowest rank does
        step_times.append(max(r["steps"][i]["wall"] for r in records))
        samples.append(sum(r["steps"][i]["samples"] for r in records))
    step = statistics.median(step_times)
    phases = {p: 1000 * statistics.median(r["steps"][i][p] for r in records for i in range(steps)) for p in PHASES}
    states = [r["state_mb"] for r in records if r.get("state_mb") is not None]
    state = max(states) if states else float("nan")
    copies = [r["copy_mb"] for r in records if r.get("copy_mb") is not None]
    copy = max(copies) if copies else float("nan")
    return statistics.median(samples) / step, 1000 * step, phases, max(r["peak_mb"] for r in records), state, copy


def run_once(config: BenchConfig, target: list[str], steps: int, warmup: int, log_dir: Path,
             timeout: float) -> tuple[float, float, dict[str, float], float, float, float]:
    """One launch of one configuration; returns what :func:`_aggregate` returns."""
    out = Path(tempfile.mkdtemp(prefix="trainfleet-bench-"))
    env = {**os.environ, **contract.bench_variables(str(out), steps, warmup)}
    launch = [sys.executable, "-m", "trainfleet.cli", "launch", "--gpus", str(config.workers),
              "--strategy", config.strategy, "--precision", config.precision,
              "--log-dir", str(log_dir / config.label.replace("/", "-"))]
    try:
        result = subprocess.run(launch + target, capture_output=True, text=True, timeout=timeout, env=env)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-8:])
            raise RuntimeError(f"{config.label} failed (exit {result.returncode}):\n{tail}")
        records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
        if len(records) != config.processes:
            raise RuntimeError(f"{config.label}: {len(records)} of {config.processes} ranks reported; "
                               "does the script use the engine's dataloader, backward and step?")
        return _aggregate(records)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def derive(results: list[BenchResult]) -> None:
    """Scaling efficiency against one worker and the speedup of each precision over fp32."""
    measured = {r.config: r for r in results if r.samples_per_s}
    for result in measured.values():
        c = result.config
        base = measured.get(BenchConfig(c.strategy, c.precision, 1)) or measured.get(BenchConfig("single", c.precision, 1))
        if base is not None:
            result.efficiency = result.median(result.samples_per_s) / (c.workers * base.median(base.samples_per_s))
        fp32 = measured.get(BenchConfig(c.strategy, "32", c.workers))
        if fp32 is not None:
            result.speedup = result.median(result.samples_per_s) / fp32.median(fp32.samples_per_s)


def run_bench(results: list[BenchResult], target: list[str], steps: int, warmup: int, rounds: int,
              log_dir: Path, progress: bool = True, timeout: float = 900) -> list[BenchResult]:
    """Measure every runnable configuration ``rounds`` times, interleaved, with a progress bar."""
    from tqdm import tqdm

    runnable = [r for r in results if r.skipped is None]
    bar = tqdm(total=rounds * len(runnable), desc="bench", disable=not progress, file=sys.stderr)
    for _ in range(rounds):
        for result in runnable:
            if result.skipped:  # failed in an earlier round
                bar.update(1)
                continue
            bar.set_postfix_str(result.config.label)
            try:
                sps, step, phases, peak, state, copy = run_once(result.config, target, steps, warmup, log_dir, timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                bar.write(f"bench: {err}")
                result.skipped = "failed: " + str(err).splitlines()[0]
                bar.update(1)
                continue
            result.samples_per_s.append(sps)
            result.step_ms.append(step)
            result.phases_ms.append(phases)
            result.peak_mb.append(peak)
            result.state_mb.append(state)
            result.copy_mb.append(copy)
            bar.update(1)
    bar.close()
    for result in runnable:
        if result.skipped:  # keep only configurations that completed every round
            result.samples_per_s, result.step_ms, result.phases_ms = [], [], []
            result.peak_mb, result.state_mb, result.copy_mb = [], [], []
    derive(results)
    return results


def threads_note(results: list[BenchResult]) -> dict[str, int]:
    """CPU threads each worker got (the launcher pins cores // workers), per configuration."""
    return {r.config.label: threads_per_worker(r.config.processes) for r in results}
