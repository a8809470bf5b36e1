"""Hang, straggler and overhead figures of the diagnosis (issue 23), 2 gloo workers:

- hang_onset_to_report: rank 1 stops in Python at step 30 of 0.1 s steps, default (adaptive)
  threshold; seconds from the moment it stopped (it writes the time) to the report line on the
  launcher's stderr. Targets: the threshold <= 10 s, and the report <= 2 s beyond it (gloo's own
  timeout: 30 minutes, NCCL's 10).
- straggler_steps_to_report: rank 1's forward takes 1.3x the others' (0.05 s steps); the steps in
  the window when it is first named. Target <= 20.
- diagnosis_overhead: a step with the progress board on against off, taking turns step by step in
  the same workers (an MLP step of ~14 ms here), a pair per round; target <= 1.01. And the board's own cost per step,
  timed alone in this process (no target).

    python -m benchmarks.diagnosis_bench [--rounds R] [--quick] [--smoke]

--smoke (one round; the overhead's pairs take 20 steps instead of 100) only checks that every line comes.
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.common import BIN, PROBES, Comparison, cleans_up, rounds_from_args, run_probe, scratch

PROBE = str(PROBES / "diagnosis_probe.py")


def hang_trial() -> tuple[float, float]:
    """(seconds from the hang to the report, the threshold the report names)."""
    out = scratch()
    job = subprocess.Popen([str(BIN / "launch"), "--gpus", "2", "--log-dir", str(out / "logs"), PROBE, str(out), "hang",
                            "--step-sleep", "0.1", "--at", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    seen: dict[str, float] = {}

    def read() -> None:
        for line in job.stderr:
            if "hang: no rank made progress" in line and "reported" not in seen:
                seen["reported"] = time.time()
                seen["threshold"] = float(re.search(r"threshold ([\d.]+)s", line).group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        job.wait(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    reader.join(timeout=5)
    onset = json.loads((out / "onset.json").read_text())["t"]
    shutil.rmtree(out, ignore_errors=True)
    if "reported" not in seen:
        raise RuntimeError("the hang was never reported")
    return seen["reported"] - onset, seen["threshold"]


def straggler_trial() -> int:
    out = scratch()
    result = subprocess.run([str(BIN / "launch"), "--gpus", "2", "--log-dir", str(out / "logs"), PROBE, str(out),
                             "straggler", "--factor", "1.3", "--step-sleep", "0.05", "--steps", "40"],
                            capture_output=True, text=True, timeout=300)
    shutil.rmtree(out, ignore_errors=True)
    found = re.search(r"straggler: rank 1 on \S+ \(node 0\) is [\d.]+x slower than its peers in forward: .*"
                      r"median of the last (\d+) steps", result.stderr)
    return int(found.group(1)) if found else 10**6


def overhead(rounds: int, steps: int = 100) -> Comparison:
    out = scratch()
    run_probe([str(BIN / "launch"), "--gpus", "2", "--log-dir", str(out / "logs"), PROBE, str(out), "overhead",
               "--step-sleep", "0", "--width", "1024", "--steps", str(steps), "--rounds", str(rounds)], out)
    samples = json.loads((out / "overhead.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return Comparison("diagnosis_overhead (step time, board on vs off, same workers)", 1.01,
                      ours=samples["on"], peer=samples["off"])


def board_cost_us(steps: int = 20000) -> float:
    """Microseconds a step's calls into the progress board take, alone in this process."""
    from trainfleet.engine.progress import ProgressBoard
    from trainfleet.engine.progress_record import BACKWARD, OPTIMIZER, create

    folder = tempfile.mkdtemp(prefix="trainfleet-board-")
    path = f"{folder}/rank0.progress"
    create(path)
    board = ProgressBoard(path, lambda: 0)
    start = time.perf_counter()
    for _ in range(steps):
        board.data_wait()
        board.batch_arrived(True)
        board.tick()
        board.enter(BACKWARD)
        board.leave()
        board.enter(OPTIMIZER)
        board.leave()
        board.step_done()
    cost = (time.perf_counter() - start) / steps * 1e6
    board.close()
    shutil.rmtree(folder, ignore_errors=True)
    return cost


@cleans_up
def main(argv: list[str] | None = None) -> None:
    rounds = rounds_from_args(__doc__, argv, rounds=5, quick=2)
    hangs = [hang_trial() for _ in range(rounds)]
    delays, thresholds = [d for d, _ in hangs], [t for _, t in hangs]
    beyond = [d - t for d, t in hangs]
    met = max(thresholds) <= 10 and max(beyond) <= 2
    spread = f"min {min(delays):.2f}, max {max(delays):.2f}, n={len(delays)}"
    threshold = statistics.median(thresholds)
    print(f"hang_onset_to_report: median {statistics.median(delays):.2f}s ({spread}); threshold {threshold:.1f}s; "
          f"beyond the threshold: median "
          f"{statistics.median(beyond):.2f}s, max {max(beyond):.2f}s (target: threshold <= 10 s, report <= 2 s "
          f"beyond it) {'MET' if met else 'MISSED'}; gloo's own timeout: 1800 s", flush=True)
    steps = [straggler_trial() for _ in range(rounds)]
    print(f"straggler_steps_to_report (1.3x forward): {sorted(steps)} steps in the window when named "
          f"(target <= 20) {'MET' if max(steps) <= 20 else 'MISSED'}", flush=True)
    smoke = "--smoke" in (argv if argv is not None else sys.argv)  # (a smoke run only checks that the line comes)
    print(overhead(max(rounds * 2, 1), 20 if smoke else 100).line(), flush=True)  # 10 rounds in a full run
    print(f"progress_board_cost_per_step: {board_cost_us():.1f} us (the engine's calls into the board of one "
          "step, alone in one process; no target)", flush=True)


if __name__ == "__main__":
    main()
