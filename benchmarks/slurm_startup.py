"""slurm_first_step_vs_sbatch_torchrun: `launch --cluster slurm` to rank 0's first step, 2 nodes x 2 workers.

The peer is what people write by hand: an sbatch script whose srun starts torchrun on
each node (static rendezvous on the first node). Both run the same probe on the same
local cluster (scripts/dev-slurm.sh), one job at a time. Ours includes the `launch`
command's own start, its sinfo check and submitit's submission. Target: <= 1.0. Every job
of a run carries one name, cancelled when the run ends, Ctrl-C included.

A breakdown line follows (medians, seconds after the command started): when the submitting
command returned, when rank 0's script started (before it imports torch), its first step.
"""
from __future__ import annotations

import json
import os
import statistics
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.common import BIN, PROBES, Comparison, cleans_up, interleave, now, rounds_from_args, scratch

PROBE = str(PROBES / "first_step.py")
JOB_NAME = f"trainfleet-bench-{os.getpid()}"  # every job of this run: scancel --name cleans up
PEER_SCRIPT = """#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=5
#SBATCH --output={out}/slurm-%j.out
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
addr=$(scontrol show node "$head" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
port=$((25000 + SLURM_JOB_ID % 10000))
srun bash -c "exec {bin}/torchrun --nnodes 2 --nproc-per-node 2 --node-rank \\$SLURM_NODEID \\
  --master-addr $addr --master-port $port {probe} {out}"
"""


BREAKDOWN: dict[str, list[tuple[float, float, float]]] = {"ours": [], "peer": []}


LINGER_S = 30  # after its first step a job gets this long to end by itself, then it is cancelled
LINGERED = {"ours": 0, "peer": 0}


def _state(job: str) -> str:
    state = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State"], capture_output=True,
                           text=True).stdout.split()
    return state[0] if state else "UNKNOWN"


def _wait_done(job: str, out: Path, side: str, timeout: float = 300) -> dict:
    """Rank 0's record (first-step and script-start times), once the job has ended (so jobs never
    overlap). A job still running LINGER_S after its first step is cancelled and counted: torchrun's
    agents can sit in their exit barrier for minutes, holding the nodes the next round needs."""
    record = out / "first_step.json"
    deadline, stepped = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if _state(job) not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "UNKNOWN"):
            break
        if stepped is None and record.is_file():
            stepped = time.monotonic()
        if stepped is not None and time.monotonic() - stepped > LINGER_S:
            LINGERED[side] += 1
            subprocess.run(["scancel", job], capture_output=True)
            stepped = float("inf")
        time.sleep(0.2)
    else:
        subprocess.run(["scancel", job], capture_output=True)
        raise RuntimeError(f"job {job} did not end within {timeout:.0f} s ({_state(job)}); see {out}")
    if not record.is_file():
        raise RuntimeError(f"job {job} ended ({_state(job)}) without a first step; see {out}")
    return json.loads(record.read_text())


def _ours() -> float:
    out = scratch()
    start = now()
    result = subprocess.run([str(BIN / "launch"), "--cluster", "slurm", "--nodes", "2", "--gpus", "2", "--cpu",
                             "--time", "5", "--job-name", JOB_NAME, "--job-dir", str(out / "runs"), PROBE, str(out)],
                            capture_output=True, text=True, check=True)
    returned = now()
    job = result.stdout.split("submitted job ")[1].split()[0]
    return _record("ours", _wait_done(job, out, "ours"), start, returned, out)


def _record(side: str, record: dict, start: float, returned: float, out: Path) -> float:
    BREAKDOWN[side].append((returned - start, record["script_start"] - start, record["t"] - start))
    shutil.rmtree(out)
    return record["t"] - start


def _peer() -> float:
    out = scratch()
    script = out / "job.sh"
    script.write_text(PEER_SCRIPT.format(name=JOB_NAME, out=out, bin=BIN, probe=PROBE))
    start = now()
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                         check=True).stdout.strip()
    returned = now()
    return _record("peer", _wait_done(job, out, "peer"), start, returned, out)


@cleans_up
def main(argv: list[str] | None = None) -> None:
    rounds = rounds_from_args(__doc__, argv, rounds=5, quick=3)
    if not (os.environ.get("SLURM_CONF") and shutil.which("sbatch")):
        print("slurm_first_step_vs_sbatch_torchrun: skipped, no SLURM cluster "
              "(eval \"$(scripts/dev-slurm.sh start)\")", flush=True)
        return
    try:
        comparison = interleave(rounds, _ours, _peer, Comparison("slurm_first_step_vs_sbatch_torchrun", target=1.0))
    finally:  # Ctrl-C or a failure included: no job of this run stays queued or running
        subprocess.run(["scancel", "--name", JOB_NAME], capture_output=True)
    print(comparison.line(), flush=True)
    print("slurm_startup breakdown (medians, s after the command): " + " | ".join(
        f"{side}: command returned {median(0):.2f}, rank 0's script started {median(1):.2f}, first step {median(2):.2f}"
        for side, median in ((side, _medians(side)) for side in ("ours", "peer"))), flush=True)
    print(f"  jobs cancelled {LINGER_S} s after their first step because they had not ended: "
          f"ours {LINGERED['ours']}, peer {LINGERED['peer']}", flush=True)


def _medians(side: str):
    kept = BREAKDOWN[side][1:] or BREAKDOWN[side]  # the rounds the comparison kept: the first is a warm-up
    return lambda i: statistics.median(row[i] for row in kept)


if __name__ == "__main__":
    main()
