"""One node's worker processes: start them, tail their logs, reap and stop them."""
from __future__ import annotations

import codecs
import collections
import errno
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

from trainfleet.engine import contract
from trainfleet.launcher.worker_process import worker_main
from trainfleet.launcher.workers import WorkerSpec
from trainfleet.utils.errors import UsageError
from trainfleet.utils.process import process_state

PRELOAD = contract.WORKER_PRELOAD  # imported before the fork, so forked workers start with them
TAIL_LINES = 20
KILL_WAIT = 30.0  # a worker still there this long after SIGKILL is stuck in the kernel (a GPU driver call)
# What NCCL's watchdog prints before it aborts a process whose collective outlived the timeout.
WATCHDOG = re.compile(r"Watchdog caught collective operation timeout: WorkNCCL\(SeqNum=(\d+), OpType=(\w+)"
                      r".*?Timeout\(ms\)=(\d+)")


def preload(start_method: str) -> None:
    """Import what starting workers needs: torch.multiprocessing, and with ``fork`` PRELOAD too (a
    spawned worker, or a fork server's, imports them itself). Loading torch's libraries holds the
    GIL for seconds on a loaded machine, so an agent does it before it connects (NodeAgent._start),
    while nobody watches its heartbeats yet."""
    if start_method == "fork":
        for module in PRELOAD:
            __import__(module)
    import torch.multiprocessing  # noqa: F401


def open_log(path: str, truncate: bool = False) -> int:
    """Open a rank's log for writing without following a link planted at its name (closed when
    ``truncate``, which only empties it for a new attempt); returns the descriptor otherwise.

    Raises:
        UsageError: the name is a symbolic link.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if truncate else os.O_APPEND)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UsageError(f"the log file {path!r} is a symbolic link; refusing to write through it.",
                             "remove the link, or pass another --log-dir.") from err
        raise
    if truncate:
        os.close(fd)
    return fd


def killpg(pid: int, signum: int) -> None:
    """Signal a process group, ignoring one that is already gone."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Worker:
    """A started worker and what the report needs about it."""

    spec: WorkerSpec
    process: Any
    started: float
    exitcode: int | None = None
    stopped_since: float | None = None  # first time it was seen frozen (state T)

    def describe_exit(self) -> str:
        code = self.exitcode
        return f"exit code {code}" if code is not None and code > 0 else f"signal {signal.Signals(-code).name}"


def exit_reason(lines: list[str]) -> str:
    """Why a worker ended, when its last log lines say what the exit code cannot ("" otherwise)."""
    for line in reversed(lines):
        if contract.IN_PLACE_IMPOSSIBLE in line:  # the engine's InPlaceImpossible: every node restarts from disk
            return line[line.index(contract.IN_PLACE_IMPOSSIBLE):].strip()
        found = WATCHDOG.search(line)
        if found:
            seq, op, limit = found.group(1), found.group(2), int(found.group(3)) / 1000
            return (f"NCCL's watchdog ended it: its collective #{seq} ({op}) waited {limit:g}s for ranks that "
                    "never joined. HINT: do all ranks reach the same collectives? With --collective-timeout "
                    "the script raises instead, naming the line")
    return ""


class LogTailer(threading.Thread):
    """Follows every rank's log file: echoes one rank to the console as it comes, keeps each tail
    and hands every complete line to ``sink(rank, line)`` (the merged console: launcher/console.py)."""

    def __init__(self, paths: dict[int, str], console_rank: int | None, interval: float = 0.02,
                 sink: Callable[[int, str], None] | None = None):
        super().__init__(name="trainfleet-log-tailer", daemon=True)
        self.paths, self.console_rank, self.interval, self.sink = paths, console_rank, interval, sink
        self.tails = {rank: collections.deque(maxlen=TAIL_LINES) for rank in paths}
        self._files: dict[int, Any] = {}
        self._partial = dict.fromkeys(paths, "")
        self._decoders = {rank: codecs.getincrementaldecoder("utf-8")("replace") for rank in paths}
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._closed = False

    def _read(self, rank: int, path: str) -> bytes:
        handle = self._files.get(rank)
        if handle is None:
            try:
                handle = self._files[rank] = open(path, "rb")  # noqa: SIM115 - kept open while it is followed
            except FileNotFoundError:
                return b""
        return handle.read()

    def _poll(self) -> None:
        with self._lock:
            if self._closed:
                return
            for rank, path in self.paths.items():
                chunk = self._read(rank, path)
                if not chunk:
                    continue
                text = self._decoders[rank].decode(chunk)  # a character split between reads waits
                if rank == self.console_rank:
                    sys.stdout.write(text)
                    sys.stdout.flush()
                lines = (self._partial[rank] + text).split("\n")
                self._partial[rank] = lines.pop()
                self.tails[rank].extend(lines)
                if self.sink is not None:
                    for line in lines:
                        self.sink(rank, line)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self._poll()

    def stop(self) -> None:
        """Stop following, after one last read of every file."""
        self._stop_event.set()
        if self.is_alive():
            self.join()
        self._poll()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for rank, rest in self._partial.items():
                if rest:
                    self.tails[rank].append(rest)
                    if self.sink is not None:
                        self.sink(rank, rest)
                    self._partial[rank] = ""
            for handle in self._files.values():
                handle.close()
            self._files.clear()

    def last_lines(self, rank: int) -> list[str]:
        return list(self.tails[rank])


class WorkerGroup:
    """The workers of one node for one attempt."""

    def __init__(self, specs: list[WorkerSpec], start_method: str, console_rank: int | None,
                 sink: Callable[[int, str], None] | None = None):
        self.specs, self.start_method = specs, start_method
        self.workers: list[Worker] = []
        self.tailer = LogTailer({s.rank: s.log_path for s in specs}, console_rank, sink=sink)

    def start(self) -> None:
        """Fork (or spawn) every worker, then start following their logs."""
        preload(self.start_method)  # (imported already, except where no agent runs this group)
        import torch.multiprocessing as mp

        context = mp.get_context(self.start_method)
        for spec in self.specs:
            Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
            open_log(spec.log_path, truncate=True)
            process = context.Process(target=worker_main, args=(spec,), name=f"rank{spec.rank}")
            process.start()
            self.workers.append(Worker(spec, process, time.monotonic()))

    def start_tailing(self) -> None:
        self.tailer.start()

    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.exitcode is None]

    def reap(self, timeout: float) -> list[Worker]:
        """Wait up to ``timeout`` for exits; return the workers that just exited."""
        alive = self.alive()
        if not alive:
            return []
        ready = set(wait([w.process.sentinel for w in alive], timeout=timeout))
        done = []
        for worker in alive:
            # A daemon the worker started keeps its end of the sentinel open: a zombie has exited too.
            if worker.process.sentinel in ready or process_state(worker.process.pid) in (None, "Z"):
                worker.process.join()
                worker.exitcode = worker.process.exitcode
                done.append(worker)
        return done

    def frozen(self, limit: float) -> Worker | None:
        """A worker stopped (``kill -STOP``, state T) for longer than ``limit`` seconds. A worker a
        debugger holds (tracing stop, state t: gdb, py-spy, debugpy attached) is not frozen: its
        user is looking at it."""
        now = time.monotonic()
        for worker in self.alive():
            if process_state(worker.process.pid) == "T":
                worker.stopped_since = worker.stopped_since or now
                if now - worker.stopped_since > limit:
                    return worker
            else:
                worker.stopped_since = None
        return None

    def forward(self, signum: int) -> None:
        """Send ``signum`` to every live worker's process group."""
        for worker in self.alive():
            killpg(worker.process.pid, signum)

    def stop(self, grace: float, terminate: bool = True) -> None:
        """SIGTERM every worker's group, SIGKILL whatever outlives ``grace``, reap everything.

        Stopped (frozen) workers get SIGKILL at once: they cannot act on SIGTERM. With
        ``terminate`` False the workers already got a signal and only get the grace period.
        """
        for worker in self.alive():
            frozen = process_state(worker.process.pid) in ("T", "t")
            if terminate or frozen:
                killpg(worker.process.pid, signal.SIGKILL if frozen else signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            self.reap(timeout=min(0.05, max(deadline - time.monotonic(), 0)))
        for worker in self.alive():
            killpg(worker.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT
        while self.alive() and time.monotonic() < deadline:
            self.reap(timeout=0.2)
        for worker in self.alive():  # waiting longer would hang the agent, and the job, with it
            print(f"launch: rank {worker.spec.rank} (pid {worker.process.pid}) is still there {KILL_WAIT:.0f}s after "
                  f"SIGKILL (state {process_state(worker.process.pid)}: stuck in the kernel, e.g. in a GPU driver "
                  "call); leaving it behind", file=sys.stderr, flush=True)
            worker.exitcode = -signal.SIGKILL
        for worker in self.workers:  # grandchildren left in an exited worker's group
            killpg(worker.process.pid, signal.SIGKILL)

    def close(self) -> None:
        self.tailer.stop()
