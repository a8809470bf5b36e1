"""``trainfleet status|logs|cancel``: a submitted job's state, logs and end, from any shell.

SLURM's view comes from ``squeue`` (live) and ``sacct`` (accounting, so finished jobs are
still there); trainfleet's own view (exit code of the agent, requeues) from each task's ``task.json``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from trainfleet.slurm import records
from trainfleet.slurm.sweep import ArrayTask
from trainfleet.utils import ledger_file
from trainfleet.utils.errors import UsageError
from trainfleet.utils.process import process_state
from trainfleet.utils.timings import read_timings, timing_table

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "STOPPED"}


@dataclass
class TaskStatus:
    """One job, or one task of an array."""

    job_id: str
    index: int | None
    values: dict[str, str]
    state: str
    exit_code: int | None
    nodes: str
    elapsed: str
    requeues: int

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


def _slurm_rows(job_id: str) -> dict[str, dict[str, str]]:
    """SLURM's view of a job's tasks: ``sacct`` (finished ones too), overlaid with ``squeue``
    for the active ones, because accounting learns of a start or a requeue a little later."""
    rows: dict[str, dict[str, str]] = {}
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State,ExitCode,NodeList,Elapsed"],
                         capture_output=True, text=True, timeout=30)
    for line in out.stdout.splitlines():
        job, state, code, nodes, elapsed = line.split("|")
        rows[job] = {"state": state.split()[0], "exit": code, "nodes": nodes, "elapsed": elapsed}
    live = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i|%T|%N|%M"], capture_output=True,
                          text=True, timeout=30)
    for line in live.stdout.splitlines():
        job, state, nodes, elapsed = line.split("|")
        old = rows.get(job, {"state": "", "exit": "0:0", "nodes": "", "elapsed": ""})
        if state == "COMPLETING" and old["state"] in TERMINAL:  # accounting already has the outcome
            continue
        rows[job] = {**old, "state": state, "nodes": nodes or old["nodes"], "elapsed": elapsed or old["elapsed"]}
    return rows


def _pid_alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def _clock(seconds: float) -> str:
    """``HH:MM:SS``, as sacct prints elapsed time."""
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def job_status(folder: Path, record: dict[str, Any]) -> list[TaskStatus]:
    """The state of every task of the job in ``folder``."""
    job_id = str(record["job_id"])
    rows = _slurm_rows(job_id) if record["cluster"] == "slurm" else {}
    statuses = []
    for task in record["tasks"]:
        index = task["index"]
        own = records.read_task_state(records.task_dir(folder, index))
        state, code = own.get("state", "PENDING"), own.get("exit_code")
        row = rows.get(job_id if index is None else f"{job_id}_{index}")
        nodes = elapsed = "-"
        if row is not None:
            nodes, elapsed = row["nodes"] or "-", row["elapsed"] or "-"
            # SLURM's word wins unless trainfleet knows more (a requeue pending, the agent's code)
            if not (row["state"] in ("REQUEUED", "PENDING") and state == "REQUEUED"):
                state = row["state"] if row["state"] != "FAILED" or code is None else state
            if code is None and row["state"] in TERMINAL:
                code = int(row["exit"].split(":")[0]) or (1 if row["state"] != "COMPLETED" else 0)
        elif record["cluster"] == "local" and state in ("RUNNING", "PENDING"):
            pid = task.get("pid")
            if pid and not _pid_alive(int(pid)):  # gone without recording an end
                state = "FAILED"
        if nodes == "-" and own.get("host"):
            nodes = own["host"]
        if elapsed == "-" and own.get("started"):  # no sacct (local jobs): trainfleet's own clock
            elapsed = _clock((own.get("ended") or time.time()) - own["started"])
        statuses.append(TaskStatus(job_id, index, task.get("values", {}), state, code, nodes, elapsed,
                                   int(own.get("requeues", 0))))
    return statuses


def format_status(folder: Path, record: dict[str, Any], statuses: list[TaskStatus], tail: int = 5) -> str:
    """A job: one block with its last log lines; an array: a table of tasks."""
    head = (f"job {record['job_id']} ({record['cluster']}): {record['nodes']} node(s) x {record['workers']} "
            f"worker(s); folder {folder}")
    if record.get("array"):
        lines = [head, f"{'task':>4}  {'state':<10} {'exit':>4}  {'requeues':>8}  {'elapsed':>10}  {'nodes':<12} values"]
        for s in statuses:
            code = "-" if s.exit_code is None else str(s.exit_code)
            lines.append(f"{s.index:>4}  {s.state:<10} {code:>4}  {s.requeues:>8}  {s.elapsed:>10}  "
                         f"{s.nodes:<12} {ArrayTask(s.index, s.values).label()}")
        counts = Counter(s.state for s in statuses)
        lines.append(", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())))
        return "\n".join(lines)
    s = statuses[0]
    lines = [head, f"state {s.state}, exit code {'-' if s.exit_code is None else s.exit_code}, nodes {s.nodes}, "
                   f"elapsed {s.elapsed}, requeues {s.requeues}"]
    lines += timing_table(read_timings(folder / "logs"))  # node 0's agent keeps it current
    account = ledger_file.read(folder / "logs")  # written at each run's end (a requeued job's continues)
    if account is not None:
        lines += ledger_file.table(account)
    log = records.rank_log(folder, 0) if tail > 0 else None
    if log is not None:
        lines.append(f"last lines of {log}:")
        lines += ["  " + line for line in log.read_text(errors="replace").splitlines()[-tail:]]
    return "\n".join(lines)


def cancel(record: dict[str, Any]) -> None:
    """End the job (every task of an array)."""
    if record["cluster"] == "slurm":
        done = subprocess.run(["scancel", str(record["job_id"])], capture_output=True, text=True)
        if done.returncode != 0:
            raise UsageError(f"scancel {record['job_id']} failed: {done.stderr.strip()}.")
        return
    for task in record["tasks"]:  # submitit's local controller stops its tasks on SIGINT
        if task.get("pid") and _pid_alive(int(task["pid"])):
            os.kill(int(task["pid"]), signal.SIGINT)


def exit_code(statuses: list[TaskStatus]) -> int:
    """The job's exit code: 0 if every task completed, else the first non-zero code (or 1)."""
    for s in statuses:
        if s.state != "COMPLETED" or s.exit_code:
            return s.exit_code or 1
    return 0


def follow(folder: Path, record: dict[str, Any], rank: int = 0, task: int | None = None,
           out: TextIO = sys.stdout, poll: float = 0.5, until_done: bool = True,
           check_every: float = 2.0) -> list[TaskStatus]:
    """Print a rank's log as it grows (it survives requeues: the log is appended to)
    until the job is over; returns the final statuses. The log is read every ``poll``
    seconds, SLURM (squeue, sacct) asked every ``check_every``: schedulers are shared."""
    index = task if task is not None else record["tasks"][0]["index"]
    where = records.task_dir(folder, index)
    offset, path, checked = 0, None, float("-inf")
    while True:
        done = False
        if time.monotonic() - checked >= check_every or not until_done:
            statuses, checked = job_status(folder, record), time.monotonic()
            done = all(s.done for s in statuses)
        path = path or records.rank_log(where, rank)
        if path is not None:  # read after the state: the last lines of a finished job are in
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            offset += len(chunk)
            out.write(chunk.decode(errors="replace"))
            out.flush()
        if not until_done or done:
            return statuses
        time.sleep(poll)
