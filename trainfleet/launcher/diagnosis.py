"""When every process is alive but the job is wrong: hangs, desynchronised ranks, stragglers.

Each rank's engine writes its progress into a record its agent maps (``engine/progress_record.py``).
Every agent reads its workers' records (:class:`NodeWatch`) and posts a summary to the control
store every :data:`SUMMARY_EVERY` seconds; node 0 merges the summaries of every node and decides
(:class:`JobWatch`):

- **hang**: no rank made progress for the threshold (progress: the engine's record moved, or the
  rank's process kept a fifth of a core busy: work outside the engine's calls is not a hang).
  ``--hang-timeout S`` sets it (0: off); by default it is max(:data:`FLOOR`, :data:`STEPS` x the median step time), and
  :data:`FIRST_STEP_ALLOWANCE` before every rank finished its first step or while one reads or
  writes a checkpoint. Node 0 then asks every node for its workers' stacks (``job/hang``), names
  the culprit (the rank not in the collective the others wait in, else the one whose progress
  stopped first) with its top frames, and fails the job: it stops, or restarts under
  ``--max-restarts``, as after any failure.
- **desync**: ranks disagree on a step's signature (collectives issued, batches fetched, the
  engine's own collectives): a skipped or extra step, an extra ``all_reduce``. The job fails,
  naming the rank, the step and what differs.
- **straggler**: a rank whose data, forward, optimizer or own-code phase is persistently (median of the
  last :data:`WINDOW` steps) :data:`SLOW` x its peers'. Said once, again when it changes; the job
  goes on. The backward phase is not compared: under DDP it holds the wait for the slowest rank.

At the end node 0 prints every rank's step time by phase, and writes ``timings.json`` to the log
folder.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from trainfleet.engine import contract
from trainfleet.utils.timings import timing_table, write_timings

record_module = contract.progress_record
SUMMARY_EVERY = 0.5  # seconds between an agent's summaries
FLOOR = 10.0  # the adaptive hang threshold is at least this
STEPS = 20  # ... or this many median steps
FIRST_STEP_ALLOWANCE = 600.0  # before the first step (imports, compile, a load) and during a checkpoint
WINDOW = 20  # steps a straggler's medians cover
SLOW = 1.25  # a phase this much slower than its peers' median ...
MIN_SHARE = 0.05  # ... by at least this share of the median step ...
MIN_GAP = 0.002  # ... and this many seconds (timer noise of a millisecond step is not a straggler), is a straggler's
COMPARED = ("data", "forward", "optimizer", "idle")  # idle: the script's own code between the engine's calls
RING_SENT = 8  # ring entries each summary carries
DUMP_WAIT = 1.5  # seconds a worker gets to write its stacks
BUSY = 0.2  # a rank whose process used this share of a core over the last second is computing, not hung
TIMINGS_EVERY = 10.0  # seconds between node 0's writes of timings.json during a run


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


class NodeWatch:
    """This node's workers' progress records, read every poll."""

    def __init__(self, specs: list[Any], node: int, host: str):
        self.node, self.host = node, host
        self.records: dict[int, Any] = {}
        self.specs = {spec.rank: spec for spec in specs if spec.progress_file}
        for rank, spec in list(self.specs.items()):
            try:
                record_module.create(spec.progress_file)
                self.records[rank] = record_module.ProgressRecord(spec.progress_file)
            except (OSError, ValueError) as err:  # diagnosis helps; it never stops a job from starting
                print(f"launch: node {node}: no progress record for rank {rank} ({err}); hang diagnosis is off "
                      "for it", file=sys.stderr)
                del self.specs[rank]
        self.snapshots: dict[int, Any] = {}
        self.cpu_marks: dict[int, tuple[float, float, int]] = {}  # rank -> (when, cpu seconds, pid)
        self.active: dict[int, float] = {}  # rank -> when its process last kept a core busy
        self.windows: dict[int, deque] = {rank: deque(maxlen=WINDOW) for rank in self.records}
        self.posted = 0.0

    def poll(self) -> None:
        now = time.monotonic()
        for rank, record in self.records.items():
            snap = record.read()
            if snap is None:
                continue
            previous = self.snapshots.get(rank)
            if snap.step > 0 and (previous is None or snap.step > previous.step):
                self.windows[rank].append({**snap.last, "step": snap.step_time})
            self.snapshots[rank] = snap
            self._note_cpu(rank, snap.pid, now)

    def read(self, rank: int) -> Any:
        """A fresh snapshot of one of this node's ranks (None: no record, or nothing in it yet)."""
        record = self.records.get(rank)
        try:
            return record.read() if record is not None else None
        except ValueError:  # closed
            return None

    def _note_cpu(self, rank: int, pid: int, now: float) -> None:
        """A rank that computes is not hung, even outside the engine's calls (a hand-written loop,
        metrics on rank 0 while the others wait): it counts as active while its process used at
        least :data:`BUSY` of a core over the last second. A hang in Python, a deadlock, a loader
        that never returns and a wait in a collective all use next to none."""
        cpu = _cpu_seconds(pid)
        mark = self.cpu_marks.get(rank)
        if cpu is None or mark is None or mark[2] != pid:
            self.cpu_marks[rank] = (now, cpu or 0.0, pid)
            return
        if now - mark[0] >= 1.0:
            if cpu - mark[1] >= BUSY * (now - mark[0]):
                self.active[rank] = now
            self.cpu_marks[rank] = (now, cpu, pid)

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.posted < SUMMARY_EVERY:
            return False
        self.posted = now
        return True

    def summary(self, alive: set[int]) -> dict[str, Any]:
        """What node 0 needs of this node's ranks (durations, not timestamps: hosts' clocks differ)."""
        now = time.monotonic()
        ranks = {}
        for rank, snap in self.snapshots.items():
            window = list(self.windows[rank])
            medians = {phase: _median([w[phase] for w in window]) for phase in (*record_module.PHASES, "step")}
            last = max(snap.tick_time, self.active.get(rank, 0.0))  # progress, or a busy CPU
            ranks[str(rank)] = {"idle": round(now - last, 3), "step": snap.step, "phase": snap.phase,
                                "ring": [list(e) for e in snap.ring[-RING_SENT:]], "med": medians, "n": len(window),
                                "alive": rank in alive, "total": snap.total, "local": self.specs[rank].local_rank,
                                "nan_step": snap.nan_step}
        return {"host": self.host, "ranks": ranks}

    def dump(self, wait: float = DUMP_WAIT) -> dict[str, Any]:
        """Every worker's stacks (its dump thread's JSON; faulthandler's text where that thread could not run)."""
        asked = {rank: record.request_dump() for rank, record in self.records.items() if rank in self.snapshots}
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(self.records[r].read().dump_done < n for r, n in asked.items()):
            time.sleep(0.05)
        dumps: dict[str, Any] = {}
        for rank, wanted in asked.items():
            path = self.specs[rank].progress_file
            snap = self.records[rank].read()
            if snap.dump_done >= wanted:
                try:
                    dumps[str(rank)] = json.loads(Path(path + ".dump").read_text())
                    continue
                except (OSError, ValueError):
                    pass
            dumps[str(rank)] = stacks_from_outside(snap.pid, path + ".stacks")
        return dumps

    def close(self) -> None:
        for record in self.records.values():
            record.close()
        self.records.clear()


def stacks_from_outside(pid: int, stacks_file: str) -> dict[str, Any]:
    """The stacks of a worker whose dump thread did not answer (its main thread holds the GIL in C
    code): py-spy's dump when py-spy is installed (Python frames with file:line, read from outside
    the process), else the C-level dump faulthandler writes on the engine's signal, and what is
    missing."""
    beside = Path(sys.executable).with_name("py-spy")  # installed into this environment, not on PATH
    spy = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if spy:
        try:
            done = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=10)
            if done.returncode == 0 and "Thread" in done.stdout:
                return {"py-spy": done.stdout.splitlines()[:80]}
        except (OSError, subprocess.TimeoutExpired):
            pass
    missing = None if spy else "py-spy is not installed (pip install py-spy): faulthandler's stack instead"
    return {"faulthandler": _faulthandler_stacks(pid, stacks_file), "missing": missing}


def _faulthandler_stacks(pid: int, path: str) -> list[str]:
    """The C-level stacks faulthandler writes on the engine's signal (a main thread holding the GIL)."""
    try:
        os.kill(pid, int(signal.SIGRTMIN) + 4)  # engine/progress.py's STACK_SIGNAL
    except OSError:
        return []
    time.sleep(0.3)
    try:
        return Path(path).read_text().splitlines()[-40:]
    except OSError:
        return []


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads), from /proc; None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def merge(summaries: dict[int, dict]) -> dict[int, dict]:
    """Every node's ranks, with their node and host, by rank."""
    ranks = {}
    for node, summary in summaries.items():
        for rank, info in (summary.get("ranks") or {}).items():
            if isinstance(info, dict) and str(rank).isdigit():
                ranks[int(rank)] = {**info, "node": node, "host": str(summary.get("host", "?"))}
    return ranks


class JobWatch:
    """Node 0's decisions over every rank's summary."""

    def __init__(self, hang_timeout: float | None, rollback: bool = False):
        self.hang_timeout = hang_timeout
        self.stragglers: frozenset = frozenset()
        self.nan_said = False
        self.rollback = rollback  # --on-nan rollback: the engine returns to the last step (and says so)

    def nan_lines(self, ranks: dict[int, dict]) -> list[str]:
        """Once: the rank(s) whose loss was first NaN or infinite (the others follow a step later,
        once the gradients are averaged); training goes on."""
        seen = {rank: r["nan_step"] for rank, r in ranks.items()
                if isinstance(r.get("nan_step"), int) and r["nan_step"] > 0}
        if self.nan_said or not seen:
            return []
        self.nan_said = True
        first = min(seen.values())
        ranks_first = sorted(rank for rank, step in seen.items() if step == first)
        where = ", ".join(f"rank {rank} on {ranks[rank].get('host', '?')} (node {ranks[rank].get('node')})"
                          for rank in ranks_first)
        if self.rollback:
            return [f"non-finite loss: first on {where} at step {first}; --on-nan rollback: every rank returns to "
                    "the last step and drops that batch (rank 0's log says each rollback)"]
        return [f"non-finite loss: first on {where} at step {first}; training goes on (the averaged gradients "
                "carry it to every rank)"]

    # ----- hang --------------------------------------------------------------------------------
    def threshold(self, ranks: dict[int, dict]) -> tuple[float, str]:
        live = [r for r in ranks.values() if r.get("alive")]
        first = any(r.get("step", 0) == 0 for r in live)
        saving = any(r.get("phase") == "checkpoint" for r in live)
        if self.hang_timeout:
            base, why = self.hang_timeout, f"--hang-timeout {self.hang_timeout:g}"
        else:
            step = _median([r["med"]["step"] for r in live if r.get("n")])
            base = max(FLOOR, STEPS * step)
            why = f"{STEPS} x the median step {step:.2f}s, at least {FLOOR:g}s"
        if first or saving:
            return max(base, FIRST_STEP_ALLOWANCE), ("before the first step" if first else "during a checkpoint")
        return base, why

    def hung(self, ranks: dict[int, dict]) -> tuple[float, float, str] | None:
        """(idle seconds, threshold, why) when no live rank progressed for the threshold."""
        if self.hang_timeout == 0:
            return None
        live = [r for r in ranks.values() if r.get("alive")]
        if not live:
            return None
        idle = min(float(r.get("idle", 0)) for r in live)
        limit, why = self.threshold(ranks)
        return (idle, limit, why) if idle >= limit else None

    def hang_report(self, ranks: dict[int, dict], dumps: dict[int, dict], idle: float, limit: float,
                    why: str) -> tuple[int, dict, list[str]]:
        """(culprit rank, its summary, the report's lines)."""
        issued = {rank: d.get("seq") for rank, d in dumps.items() if isinstance(d.get("seq"), int)}
        culprits, waited = [], None
        if issued and len(set(issued.values())) > 1:
            top = max(issued.values())
            culprits = sorted(rank for rank, seq in issued.items() if seq < top)
            waiter = next(rank for rank, seq in issued.items() if seq == top)
            pending = dumps[waiter].get("pending") or {}
            waited = f"{pending.get('op', 'a collective')} #{top}"
        if not culprits:  # not told apart by the collectives: not waiting in one, silent, stopped first
            live = {rank: r for rank, r in ranks.items() if r.get("alive")} or ranks
            culprits = [max(live, key=lambda rank: (live[rank].get("phase") not in ("backward", "collective"),
                                                    rank not in issued, float(live[rank].get("idle", 0))))]
        culprit = culprits[0]
        info = ranks.get(culprit, {})
        lines = [f"hang: no rank made progress for {idle:.1f}s (threshold {limit:.1f}s: {why})"]
        where = f"rank {culprit} on {info.get('host', '?')} (node {info.get('node', '?')})"
        because = (f"not in the collective the others wait in ({waited})" if waited
                   else "stopped first, outside any collective")
        lines.append(f"culprit: {where}: {because}; step {info.get('step', '?')}, phase {info.get('phase', '?')}")
        lines += [f"  {frame}" for frame in top_frames(dumps.get(culprit, {}))]
        lines.append("every rank: last completed step, phase, collectives issued, idle")
        for rank in sorted(ranks):
            r, d = ranks[rank], dumps.get(rank, {})
            pending = d.get("pending") or {}
            waiting = f", last collective {pending.get('op')} #{pending.get('seq')}" if pending else ""
            lines.append(f"  rank {rank} ({r.get('host', '?')}, node {r.get('node')}): step {r.get('step')}, "
                         f"{r.get('phase')}, issued {d.get('seq', '?')}{waiting}, idle {float(r.get('idle', 0)):.1f}s")
        return culprit, info, lines

    # ----- desync ------------------------------------------------------------------------------
    def desync(self, ranks: dict[int, dict]) -> tuple[int, dict, str, list[str]] | None:
        """(rank, its summary, how, lines) for the first step whose signature the ranks disagree on."""
        by_step: dict[int, dict[int, tuple]] = {}
        for rank, r in ranks.items():
            for entry in r.get("ring") or []:
                if isinstance(entry, list) and len(entry) == 4 and all(isinstance(v, int) for v in entry):
                    by_step.setdefault(entry[0], {})[rank] = tuple(entry[1:])
        for step in sorted(by_step):
            seen = by_step[step]
            if len(seen) < 2 or len(set(seen.values())) == 1:
                continue
            counts: dict[tuple, int] = {}
            for value in seen.values():
                counts[value] = counts.get(value, 0) + 1
            # the majority is right; in a tie the rank that did more (an extra batch or collective) is the odd one
            usual = max(counts, key=lambda v: (counts[v], -sum(v)))
            odd = sorted(rank for rank, value in seen.items() if value != usual)
            rank = odd[0]
            theirs, ours = seen[rank], usual
            names = ("collectives issued", "batches fetched", "engine collectives")
            differs = [f"{name} {a} (the others {b})" for name, a, b in zip(names, theirs, ours) if a != b]
            hint = ("a skipped or extra step?" if theirs[1] != ours[1]
                    else "an extra or missing engine.all_reduce/barrier/broadcast?" if theirs[2] != ours[2]
                    else "a collective of its own, outside the engine?")
            info = ranks[rank]
            how = f"desynchronised at step {step}: {'; '.join(differs)}"
            lines = [f"desync: rank {rank} on {info.get('host', '?')} (node {info.get('node')}) is out of step with "
                     f"the others at step {step}: {'; '.join(differs)} ({hint})",
                     "its collectives no longer pair with the others': the job is stopped before it trains (and "
                     "checkpoints) a wrong model"]
            for other in sorted(seen):
                lines.append(f"  rank {other}: by step {step}: " + ", ".join(
                    f"{name} {value}" for name, value in zip(names, seen[other])))
            return rank, info, how, lines
        return None

    # ----- stragglers -------------------------------------------------------------------------
    def straggler_lines(self, ranks: dict[int, dict]) -> list[str]:
        """Lines to print when the set of stragglers changed, else none."""
        ready = {rank: r for rank, r in ranks.items() if r.get("n", 0) >= WINDOW // 2 and r.get("alive")}
        found = []
        if len(ready) >= 2:
            step = _median([r["med"]["step"] for r in ready.values()])
            for rank, r in sorted(ready.items()):
                worst = None
                for phase in COMPARED:
                    mine = r["med"].get(phase, 0.0)
                    peers = _median([o["med"].get(phase, 0.0) for other, o in ready.items() if other != rank])
                    if mine > SLOW * peers and mine - peers > max(MIN_SHARE * step, MIN_GAP):
                        ratio = mine / peers if peers > 0 else float("inf")
                        if worst is None or ratio > worst[1]:
                            worst = (phase, ratio, mine, peers)
                if worst is not None:
                    found.append((rank, worst))
        current = frozenset((rank, w[0]) for rank, w in found)
        if len(ready) < 2 or current == self.stragglers:  # too few ranks to compare (some finished)
            return []
        self.stragglers = current
        if not found:
            return ["stragglers: none now"]
        lines = []
        for rank, (phase, ratio, mine, peers) in found:
            r = ready[rank]
            where = f"rank {rank} on {r.get('host', '?')} (node {r.get('node')})"
            what = "its own code between the engine's calls" if phase == "idle" else phase
            times = f"{ratio:.1f}x slower" if peers >= 0.001 else "slower"
            lines.append(f"straggler: {where} is {times} than its peers in {what}: "
                         f"{mine * 1000:.0f} ms vs {peers * 1000:.0f} ms (median of the last {r.get('n')} steps); "
                         "the others wait for it")
        return lines

    # ----- the end ----------------------------------------------------------------------------
    @staticmethod
    def timing_table(ranks: dict[int, dict]) -> list[str]:
        return timing_table(ranks, WINDOW)


def top_frames(dump: dict, count: int = 6) -> list[str]:
    """The culprit's main thread, innermost frames first, as ``File "x.py", line N, in f``."""
    if "py-spy" in dump:  # "Thread N (idle): "MainThread"" then "    function (file.py:line)", innermost first
        lines = [str(line) for line in dump["py-spy"]]
        start = next((i for i, line in enumerate(lines) if line.startswith("Thread")), len(lines))
        frames = []
        for line in lines[start + 1:start + 1 + 40]:
            where = line.strip().rpartition("(")[2].rstrip(")")
            if not line.startswith(" ") or _machinery(where.rpartition(":")[0]):
                break
            frames.append("(py-spy) " + line.strip())
        return frames[:count] or ["(py-spy) " + line.strip() for line in lines[start:start + count]]
    if "faulthandler" in dump:
        said = [f"({dump['missing']})"] if dump.get("missing") else []
        lines = [str(line).strip() for line in dump["faulthandler"][:count]]
        return said + (lines or ["(no stack: the process did not answer)"])
    threads = dump.get("threads") or []
    main = next((t for t in threads if t.get("main")), threads[0] if threads else None)
    if main is None:
        return ["(no stack)"]
    frames = []
    for frame in main.get("frames", []):  # innermost first; outward from the script's first line is machinery
        if not isinstance(frame, list) or len(frame) != 3 or _machinery(str(frame[0])):
            break
        frames.append(frame)
    lines = [f'File "{f[0]}", line {f[1]}, in {f[2]}' for f in frames[:count]]
    others = [t for t in threads if not t.get("main") and t.get("frames")]
    for thread in others[:3]:
        f = thread["frames"][0]
        lines.append(f'(thread {thread.get("name")}) File "{f[0]}", line {f[1]}, in {f[2]}')
    return lines


class AttemptDiagnosis:
    """One attempt's diagnosis on one agent: read the workers' records, post the summaries and, on
    node 0, decide; the agent calls :meth:`check` every poll and fails the attempt on what it returns.

    Args:
        channel: the agent's control channel (summaries and stacks go through the store).
        specs: this node's workers; those without a progress record are not watched.
        attempt: the attempt's number (keys are per attempt).
        hang_timeout: ``--hang-timeout`` (None adapts, 0 is off).
        say: how the agent prints a line.
    """

    def __init__(self, channel: Any, specs: list[Any], node: int, attempt: int, hang_timeout: float | None,
                 host: str, say: Any, rollback: bool = False):
        self.channel, self.node, self.attempt, self.say = channel, node, attempt, say
        self.watch = NodeWatch(specs, node, host)
        self.job = JobWatch(hang_timeout, rollback) if node == 0 else None
        self.dumped = False
        self.hang: tuple[float, float, str, float] | None = None  # node 0: (idle, limit, why, asked at)
        self.ranks: dict[int, dict] = {}  # node 0: the last merged summaries
        self.timings_folder: Any = None  # node 0: where timings.json goes (trainfleet status reads it)
        self._written = 0.0
        if node == 0:
            channel.progress.clear()
            channel.hang_reports.clear()

    def check(self, alive: set[int]) -> Any:
        """A :class:`~trainfleet.launcher.store_values.Failure` when the job is hung or out of step."""
        from trainfleet.launcher.store_values import Failure

        watch, channel = self.watch, self.channel
        if not watch.records:
            return None
        watch.poll()
        if self.node == 0:  # its own ranks, fresh every poll (the others' come every SUMMARY_EVERY)
            channel.progress[0] = watch.summary(alive)
        elif watch.due():
            channel.post(f"progress/{self.attempt}/{self.node}", json.dumps(watch.summary(alive)))
        if channel.hang_attempt == self.attempt and not self.dumped:
            self.dumped = True
            if self.node == 0:
                channel.hang_reports[0] = watch.dump()
            else:
                channel.post(f"hang/{self.attempt}/{self.node}", json.dumps(watch.dump()))
        if self.job is None:
            return None
        self.ranks = merge(channel.members_progress())
        if self.hang is not None:
            return self._hang_failure(Failure)
        odd = self.job.desync(self.ranks)
        if odd is not None:
            rank, info, how, lines = odd
            return Failure(int(info.get("node", 0)), rank, how, lines, _local(info), report=True)
        for line in self.job.straggler_lines(self.ranks) + self.job.nan_lines(self.ranks):
            self.say(line)
        if self.timings_folder is not None and time.monotonic() - self._written > TIMINGS_EVERY:
            self._written = time.monotonic()
            self.write_timings()
        hung = self.job.hung(self.ranks)
        if hung is not None:
            self.hang = (*hung, time.monotonic())
            channel.post("job/hang", str(self.attempt))  # every other node: send your workers' stacks
            channel.hang_attempt = self.attempt  # and this one's, at once
            return self.check(alive)
        return None

    def _hang_failure(self, failure_type: Any) -> Any:
        idle, limit, why, asked = self.hang
        members = [n for n in self.channel.members]
        if len(self.channel.hang_reports) < len(members) and time.monotonic() - asked < DUMP_WAIT + 2.5:
            return None  # the nodes' stacks are on their way
        dumps: dict[int, dict] = {}
        for report in self.channel.hang_reports.copy().values():
            for rank, dump in report.items():
                if str(rank).isdigit() and isinstance(dump, dict):
                    dumps[int(rank)] = dump
        rank, info, lines = self.job.hang_report(self.ranks, dumps, idle, limit, why)
        how = f"hung: no rank made progress for {idle:.1f}s (threshold {limit:.1f}s)"
        return failure_type(int(info.get("node", 0)), rank, how, lines, _local(info), report=True)

    def post_final(self, alive: set[int]) -> None:
        """This node's last summary, before it says its workers are done: node 0's table then
        holds every node's ranks, however short the run."""
        if not self.watch.records:
            return
        self.watch.poll()
        summary = self.watch.summary(alive)
        if self.node == 0:
            self.channel.progress[0] = summary
        else:
            self.channel.post(f"progress/{self.attempt}/{self.node}", json.dumps(summary))

    def final_lines(self) -> list[str]:
        if self.job is None:
            return []
        self.ranks = merge(self.channel.members_progress())
        return JobWatch.timing_table(self.ranks)

    def write_timings(self) -> None:
        if self.timings_folder is None or not self.ranks:
            return
        try:
            write_timings(self.timings_folder, self.ranks)
        except OSError:
            pass

    def close(self) -> None:
        self.watch.close()


def _machinery(filename: str) -> bool:
    """A frame of the worker's start-up (runpy, trainfleet's worker entry), not the script's."""
    name = filename.replace(os.sep, "/")
    return (name.startswith("<frozen") or "trainfleet/launcher/" in name or "/multiprocessing/" in name
            or name.startswith("multiprocessing/"))


def _local(info: dict) -> int | None:
    local = info.get("local")
    return local if isinstance(local, int) and not isinstance(local, bool) else None
