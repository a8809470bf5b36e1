"""Shared helpers: interleaved rounds, medians, the one-line verdict each benchmark prints, and
the clean-up every benchmark's main gets (no process of it outlives it, Ctrl-C included)."""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
PROBES = Path(__file__).resolve().parent / "probes"
BIN = Path(sys.executable).parent
MIN_PAIRS = 3  # fewer timed pairs (--quick, --smoke) get no verdict: their quartiles say little
TAG = "TRAINFLEET_BENCH_RUN"  # set in every process a benchmark starts, to the benchmark's pid


def kill_tagged() -> None:
    """Kill every process this benchmark started, wherever it went: torchrun's workers run in
    sessions of their own and outlive a killed agent, and a worker still in its rendezvous was
    never recorded anywhere. Stopped ones are continued first so they can take the signal."""
    from trainfleet.utils.process import processes_with

    owner = os.environ.get(TAG)
    for _ in range(100):
        found = [pid for pid in processes_with(TAG, owner) if pid != os.getpid()] if owner else []
        if not found:
            return
        for pid in found:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)


def cleans_up(main: Callable) -> Callable:
    """A benchmark's main: every process it starts inherits TAG; when it returns or fails, or on
    Ctrl-C or SIGTERM, they are all killed. Nested mains (benchmarks/run.py) leave it to the
    outermost."""
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None):
        if os.environ.get(TAG) == str(os.getpid()):
            return main(argv)
        os.environ[TAG] = str(os.getpid())
        previous = signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
        try:
            return main(argv)
        finally:
            kill_tagged()
            signal.signal(signal.SIGTERM, previous)
            del os.environ[TAG]
    return wrapper


@dataclass
class Comparison:
    """Samples of ours against a peer's, gathered in interleaved pairs (A B, B A, ...).

    The ratio is the median of the per-pair ratios (ours / peer): each pair ran side by side, so
    the machine's drift between pairs cancels. The verdict is MET or MISSED only when the middle
    half of the pair ratios (the quartiles) lies on one side of the target, else INCONCLUSIVE;
    timed comparisons of fewer than MIN_PAIRS pairs get no verdict.
    """

    name: str
    target: float | None
    lower_is_better: bool = True
    ours: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    counted: bool = False  # bytes or counts, not times: one pair decides

    def pair_ratios(self) -> list[float]:
        return sorted(a / b for a, b in zip(self.ours, self.peer))

    @property
    def ratio(self) -> float:
        return statistics.median(self.pair_ratios())

    def quartiles(self) -> tuple[float, float]:
        """The first and third quartiles of the pair ratios, by the inclusive method: they lie
        within the ratios' range (the exclusive one puts them outside it for few pairs)."""
        ratios = self.pair_ratios()
        if len(ratios) < 2:
            return ratios[0], ratios[0]
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return q1, q3

    def verdict(self) -> str:
        if self.target is None:
            return "(no target)"
        good = (lambda r: r <= self.target) if self.lower_is_better else (lambda r: r >= self.target)
        if len(self.ours) < MIN_PAIRS and not self.counted:
            return f"INCONCLUSIVE (timed: a verdict takes {MIN_PAIRS} pairs)"
        q1, q3 = self.quartiles()
        return "MET" if good(q1) and good(q3) else "MISSED" if not good(q1) and not good(q3) else "INCONCLUSIVE"

    def decided(self) -> bool:
        return not self.verdict().startswith("INCONCLUSIVE")

    def line(self) -> str:
        """``name: ratio X (target T) VERDICT``, then the samples and the per-pair ratios."""
        sign = "<=" if self.lower_is_better else ">="
        spread = lambda xs: f"median {statistics.median(xs):.4g} (min {min(xs):.4g}, max {max(xs):.4g}, n={len(xs)})"
        target = "" if self.target is None else f"(target {sign} {self.target}) "
        ratios, (q1, q3) = self.pair_ratios(), self.quartiles()
        return (f"{self.name}: ratio {self.ratio:.3f} {target}{self.verdict()}\n"
                f"  ours: {spread(self.ours)}\n  peer: {spread(self.peer)}\n"
                f"  per-pair ratios: median {self.ratio:.3f}, quartiles {q1:.3f}-{q3:.3f} "
                f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f}, {len(ratios)} pairs)")


def interleave(rounds: int, ours: Callable[[], float], peer: Callable[[], float], comparison: Comparison,
               warmup: int = 1) -> Comparison:
    """Run ``ours`` and ``peer`` alternately, swapping who goes first every round (A B, B A, ...)
    so neither always pays for the other's after-effects (writeback, cache); the first
    ``warmup`` pairs are discarded (not in a one-round smoke run, which only checks it runs).
    Always ``rounds`` pairs: adding rounds only while the verdict is inconclusive would stop at
    the first lucky side of the target and bias the verdict."""
    warmup = warmup if rounds > 1 else 0
    for index in range(rounds + warmup):
        if index % 2 == 0:
            a, b = ours(), peer()
        else:
            b, a = peer(), ours()
        if index >= warmup:
            comparison.ours.append(a)
            comparison.peer.append(b)
    return comparison


def run_probe(cmd: list[str], out_dir: Path, timeout: float = 300, env: dict | None = None) -> None:
    """Run a probe command; raise with its output if it fails."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def median_step(mode: str, launch_args: list[str], steps: int, model: str, *probe_args: str) -> dict:
    """Run the step probe under ``launch``; returns its median step time and samples/s (of the
    first loop, for a ``a+b`` mode), and ``steps``: every loop's median step time."""
    import shutil

    out = scratch()
    run_probe([str(BIN / "launch"), *launch_args, str(PROBES / "step_probe.py"), str(out), mode,
               "--steps", str(steps), "--model", model, *probe_args], out)
    record = json.loads((out / f"{mode}.json").read_text())
    shutil.rmtree(out)
    step = statistics.median(record["step_times"])
    loops = {key.split(".", 1)[1]: statistics.median(times) for key, times in record.items()
             if key.startswith("step_times.")}
    return {"step": step, "samples_per_s": record["samples_per_step"] / step, "steps": loops,
            "samples_per_step": record["samples_per_step"]}


def paired_steps(comparison: Comparison, rounds: int, mode: str, launch_args: list[str], steps: int, model: str,
                 *probe_args: str) -> Comparison:
    """``rounds`` runs of an ``ours+peer`` probe mode: in each, the two loops take turns step by
    step in the same workers, and their median step times are one pair."""
    ours, peer = mode.split("+")
    for _ in range(rounds):
        medians = median_step(mode, launch_args, steps, model, *probe_args)["steps"]
        comparison.ours.append(medians[ours])
        comparison.peer.append(medians[peer])
    return comparison


def pop_option(argv: list[str] | None, name: str, default: Any, kind: Callable[[str], Any]) -> tuple[Any, list[str]]:
    """``name VALUE`` taken out of ``argv`` (the command line when None): (its value, the rest)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if name not in argv:
        return default, argv
    at = argv.index(name)
    value = kind(argv[at + 1])
    del argv[at:at + 2]
    return value, argv


def rounds_from_args(doc: str, argv: list[str] | None, rounds: int, quick: int) -> int:
    """--rounds N, --quick (``quick`` rounds) or --smoke (one round): the number of rounds."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--quick", action="store_true", help=f"{quick} rounds")
    parser.add_argument("--smoke", action="store_true", help="1 round")
    args = parser.parse_args(argv)
    return 1 if args.smoke else (quick if args.quick else args.rounds)


def step_benchmark_args(doc: str, argv: list[str] | None, rounds: int, steps: int,
                        quick: tuple[int, int]) -> argparse.Namespace:
    """The options every step benchmark takes: --rounds/--steps/--model, --quick, --smoke."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--quick", action="store_true", help=f"{quick[0]} rounds of {quick[1]} steps")
    parser.add_argument("--smoke", action="store_true", help="1 round of 3 steps on lenet")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.model = 1, 3, "lenet"
    elif args.quick:
        args.rounds, args.steps = quick
    return args


def read_json_files(folder: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(pattern))]


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="trainfleet-bench-"))


def now() -> float:
    return time.time()
