"""The job's ledger: where every second of its wall time went, kept by node 0's agent.

The wall time runs from the start of node 0's agent process to its report. Node 0's agent splits
it into segments it can see itself (pre-flight, each attempt's workers running, their teardown,
the wait for the next attempt) and, while the workers run, reads global rank 0's account from its
progress record (``engine/progress.py``): seconds in its first step, the other steps, saves,
loads, evaluation and in-place recovery, exact to the engine's clock. What the account does not
explain inside an attempt is before the engine began (start-up; for a later attempt, restart) or
after its last event (failure detection when the attempt failed, teardown when it finished).

Steps at or below the furthest global step an earlier attempt (or an earlier run of a requeued
SLURM job) reached are recomputed work, not productive. A requeued job continues its ledger from
the file beside the logs; the time between the two runs is the requeue wait. The rows add up to
the wall time; ``idle / unaccounted`` is what is left (rounding, and a job without the Engine,
whose workers' time cannot be itemised).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from trainfleet.engine.contract import write_json
from trainfleet.utils.ledger_file import FILE, KEYS, read

# rank 0's account kinds -> rows
FROM_ACCOUNT = {"first": "first_step", "save": "save", "load": "load", "eval": "eval", "detect": "detection",
                "recover": "restart"}


AFTER_LAST_EVENT = {"failed": "detection", "lost": "detection", "ok": "teardown", "signal": "teardown"}


def process_age() -> float:
    """Seconds since this process started (its interpreter's start-up included)."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def job_id() -> str | None:
    """The SLURM job (or array task) this agent runs in, which a requeue keeps; None outside SLURM."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


class Ledger:
    """Node 0's account of the job's wall time.

    Args:
        folder: where ``ledger.json`` goes (the log folder).
        job_id: the SLURM job (``<id>`` or ``<array id>_<task>``) a requeue continues; None: a
            fresh ledger every run.
        origin: the job's start (``time.monotonic()``) when it is not this process's start (the
            launcher of simulated nodes started before their agents).
    """

    def __init__(self, folder: Path | None, job_id: str | None = None, origin: float | None = None):
        now = time.monotonic()
        self.folder, self.job_id = folder, job_id
        self.started = now - process_age()
        if origin is not None and now - 86400 < origin <= now:
            self.started = origin
        self.wall_started = time.time() - (now - self.started)
        self.rows = dict.fromkeys(KEYS, 0.0)
        self.recomputed_steps = 0
        self.high = -1  # the furthest global step reached before the current attempt
        self.reached = -1
        self.previous_wall = 0.0  # a requeued job's earlier runs
        self.runs = 1
        self.attempts = 0
        self.itemised = True
        self.segment, self.since = "startup", self.started
        self._attempt: dict[str, Any] | None = None
        self._continue()

    # ----- a requeued SLURM job ----------------------------------------------------------------
    def _continue(self) -> None:
        """Take over the ledger of this SLURM job's earlier run (same job id), adding the wait."""
        if self.folder is None or self.job_id is None:
            return
        before = read(self.folder)
        if before is None or before.get("job") != self.job_id or not isinstance(before.get("ended"), (int, float)):
            return
        rows, ended = before["rows"], before["ended"]
        for key in KEYS:
            value = rows.get(key)
            if isinstance(value, (int, float)) and value >= 0:
                self.rows[key] = float(value)
        wait = max(self.wall_started - ended, 0.0)
        self.rows["requeue"] += wait
        self.previous_wall = float(before.get("wall") or 0.0) + wait
        for name in ("high", "recomputed_steps"):
            value = before.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, value)
        self.reached = self.high
        runs = before.get("runs")
        self.runs = (runs if isinstance(runs, int) and runs > 0 else 1) + 1

    # ----- segments -----------------------------------------------------------------------------
    def _close(self, now: float) -> None:
        if self._attempt is None:
            self.rows[self.segment] += max(now - self.since, 0.0)

    def begin(self, segment: str, now: float | None = None) -> None:
        """The agent's own time from now on: ``teardown`` or ``restart``."""
        now = time.monotonic() if now is None else now
        if self._attempt is not None:
            return  # an attempt is open: end_attempt closes it
        self._close(now)
        self.segment, self.since = segment, now

    def begin_attempt(self, now: float | None = None) -> None:
        """The workers of an attempt are being started."""
        now = time.monotonic() if now is None else now
        self._close(now)
        self.attempts += 1
        self._attempt = {"spawned": now, "seen": {}, "began": None, "explained": 0.0,
                         "first": self.attempts == 1 and self.runs == 1}
        self.high = max(self.high, self.reached)

    def watch(self, account: dict[str, Any] | None) -> None:
        """Rank 0's account as its record says now (None: no engine yet)."""
        attempt = self._attempt
        if attempt is None or not account:
            return
        if account["began"] != attempt["began"]:  # a new process: its account starts from 0
            attempt["began"], attempt["seen"] = account["began"], {}
        seen = attempt["seen"]
        for kind, row in FROM_ACCOUNT.items():
            if kind == "first" and not attempt["first"]:
                row = "restart"  # a restarted attempt's warm-up is what the restart cost
            delta = account[kind] - seen.get(kind, 0.0)
            if delta > 0:
                self.rows[row] += delta
                attempt["explained"] += delta
        base = max(int(account["base"]), 0)  # unknown (no resume): from 0
        before, done = int(seen.get("count", 0)), int(account["count"])
        if done > before:  # global steps base+before+1 .. base+done; those up to `high` were computed before
            self.recomputed_steps += max(min(base + done, self.high) - (base + before), 0)
            self.reached = max(self.reached, base + done)
        delta = account["steps"] - seen.get("steps", 0.0)  # the counted steps after the first
        if delta > 0:
            timed = done - max(before, 1)
            again = max(min(base + done, self.high) - (base + max(before, 1)), 0)
            share = min(again / timed, 1.0) if timed > 0 else 0.0
            self.rows["recomputed"] += delta * share
            self.rows["productive"] += delta * (1 - share)
            attempt["explained"] += delta
        attempt["seen"] = {**{kind: account[kind] for kind in (*FROM_ACCOUNT, "steps")}, "count": done}

    def end_attempt(self, how: str, itemised: bool = True, now: float | None = None) -> None:
        """The attempt's outcome (``Outcome.kind``) is known and its workers are about to be
        stopped: what rank 0's account did not explain is start-up (or restart) before its engine
        began, and after its last event failure detection ("failed", "lost"), teardown ("ok",
        "signal") or restart (the job stopped to take new nodes)."""
        attempt = self._attempt
        if attempt is None:
            return
        now = time.monotonic() if now is None else now
        self._attempt = None
        length = max(now - attempt["spawned"], 0.0)
        rest = max(length - attempt["explained"], 0.0)
        before_row = "startup" if attempt["first"] else "restart"
        if attempt["began"] is None:  # no engine (or it never began): start-up, unless the script ran without one
            itemised = itemised and how != "ok"
            self.itemised = self.itemised and itemised
            self.rows[before_row if itemised else "idle"] += rest
        else:
            before = min(max(attempt["began"] - attempt["spawned"], 0.0), rest)
            self.rows[before_row] += before
            after = AFTER_LAST_EVENT.get(how, "restart")
            self.rows[after] += rest - before
        self.segment, self.since = "teardown", now

    # ----- the result ---------------------------------------------------------------------------
    def finish(self, now: float | None = None) -> dict[str, Any]:
        """Close the books: the rows, the wall time and the goodput (also written beside the logs)."""
        now = time.monotonic() if now is None else now
        if self._attempt is not None:
            self.end_attempt("failed", now=now)
        self._close(now)
        wall = self.previous_wall + (now - self.started)
        self.rows["idle"] += max(wall - sum(self.rows.values()), 0.0)
        result = {"job": self.job_id, "wall": wall, "rows": dict(self.rows),
                  "goodput": self.rows["productive"] / wall if wall > 0 else 0.0,
                  "recomputed_steps": self.recomputed_steps, "high": max(self.high, self.reached),
                  "attempts": self.attempts, "runs": self.runs, "ended": time.time(), "itemised": self.itemised}
        if self.folder is not None:
            try:
                write_json(self.folder / FILE, result)
            except OSError:
                pass
        return result
