"""The merged console: 16 ranks (``launch --nodes 4 --gpus 4``, simulated nodes) each print, per
round, a line of their own, a warning only ranks 1 and 3-7 print and a line every rank prints
(tests/scripts/console_lines.py, which notes when each line was written).

Checked per round: every distinct line is on the console exactly once (rank 0's unchanged, the
others' with their rank set) and none is missing against the per-rank files. Measured: each console
line's latency (read here minus written, by the last rank that wrote it), for rank 0's own lines
(echoed as they come: the peer path, in the same run) and for the merged lines; "added" is a merged
line's latency minus the median of rank 0's. Target: added latency per line <= 50 ms.

    python -m benchmarks.console_merge [--rounds R] [--quick] [--smoke] [--lines-per-run N]
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.common import BIN, REPO, cleans_up, pop_option, rounds_from_args, scratch

SCRIPT = str(REPO / "tests" / "scripts" / "console_lines.py")
PREFIX = re.compile(r"^\[ranks? ([0-9,\-]+)\] (.*)$")


def expand(ranks: str) -> list[int]:
    out: list[int] = []
    for part in ranks.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def run_job(rounds: int, console: str = "merged") -> tuple[list[tuple[float, str]], dict[int, list], Path, str]:
    """(console lines with the time each was read, each rank's (text, written) list, folder, stderr)."""
    out = scratch()
    job = subprocess.Popen([str(BIN / "launch"), "--nodes", "4", "--gpus", "4", "--console", console,
                            "--log-dir", str(out / "logs"), SCRIPT, str(out), "--rounds", str(rounds)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    seen = [(time.time(), line.rstrip("\n")) for line in job.stdout]
    stderr = job.stderr.read()
    if job.wait(timeout=300) != 0:
        raise SystemExit(f"console_merge: the job failed:\n{stderr[-2000:]}")
    written = {rank: json.loads((out / f"written.{rank}.json").read_text()) for rank in range(16)}
    return seen, written, out, stderr


def check(seen: list[tuple[float, str]], written: dict[int, list], logs: Path) -> tuple[list[str], dict[str, list]]:
    """Problems (empty when every distinct line is shown once and none is lost), and the latencies."""
    problems: list[str] = []
    shown: dict[str, list[tuple[float, list[int]]]] = {}
    for at, line in seen:
        found = PREFIX.match(line)
        ranks, text = (expand(found.group(1)), found.group(2)) if found else ([0], line)
        shown.setdefault(text, []).append((at, ranks))
    printed: dict[str, set[int]] = {}
    times: dict[tuple[str, int], float] = {}
    for rank, lines in written.items():
        for text, when in lines:
            printed.setdefault(text, set()).add(rank)
            times[(text, rank)] = when
    for text, ranks in printed.items():
        copies = shown.get(text, [])
        if len(copies) != 1:
            problems.append(f"{text!r}: shown {len(copies)} times (printed by ranks {sorted(ranks)})")
            continue
        if 0 not in ranks and sorted(copies[0][1]) != sorted(ranks):
            problems.append(f"{text!r}: shown for ranks {copies[0][1]}, printed by {sorted(ranks)}")
    for rank in range(16):  # nothing on the console that a rank's file does not hold, nothing lost
        in_file = set((logs / f"node{rank // 4}" / f"rank{rank}.log").read_text().splitlines())
        mine = {text for text, ranks in printed.items() if rank in ranks}
        if not mine <= in_file:
            problems.append(f"rank {rank}: lines missing from its log file: {sorted(mine - in_file)[:3]}")
    latency: dict[str, list[float]] = {"rank 0": [], "merged": []}
    for text, copies in shown.items():
        if text not in printed or len(copies) != 1:
            continue
        at = copies[0][0]
        last = max(times[(text, r)] for r in printed[text])
        if printed[text] == {0}:
            latency["rank 0"].append(at - last)
        elif 0 not in printed[text]:  # shown with its rank set by node 0's merger
            latency["merged"].append(at - last)
    return problems, latency


def quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    if not ordered:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))], ordered[-1]


@cleans_up
def main(argv: list[str] | None = None) -> None:
    lines_per_run, argv = pop_option(argv, "--lines-per-run", 10, int)
    runs = rounds_from_args(__doc__, argv, rounds=3, quick=1)
    if "--smoke" in (argv or []):
        lines_per_run = 2
    problems: list[str] = []
    latency: dict[str, list[float]] = {"rank 0": [], "merged": []}
    for _ in range(runs):
        seen, written, out, _ = run_job(lines_per_run)
        found, lat = check(seen, written, out / "logs")
        problems += found
        for kind, values in lat.items():
            latency.setdefault(kind, []).extend(values)
        shutil.rmtree(out, ignore_errors=True)
    base = quantiles(latency["rank 0"])[0]
    merged = [v - base for v in latency["merged"]]
    med, p90, worst = quantiles(merged)
    r0 = quantiles(latency["rank 0"])
    print(f"console_merge: {runs} run(s) of 16 ranks x {lines_per_run} rounds: "
          f"{len(problems)} problem(s) (each distinct line once, none lost against the per-rank files)"
          + (f": {problems[:3]}" if problems else ""), flush=True)
    print(f"console_merge: latency of rank 0's own lines (echoed as they come): median {1000 * r0[0]:.0f} ms, "
          f"p90 {1000 * r0[1]:.0f} ms, worst {1000 * r0[2]:.0f} ms ({len(latency['rank 0'])} lines)", flush=True)
    print(f"console_merge: added latency of merged lines (minus rank 0's median): median {1000 * med:.0f} ms, "
          f"p90 {1000 * p90:.0f} ms, worst {1000 * worst:.0f} ms ({len(merged)} lines; target <= 50 ms per line) "
          f"{'MET' if worst <= 0.05 and not problems else 'MISSED'}", flush=True)


if __name__ == "__main__":
    main()
