"""One console for all ranks (``--console merged``, the default).

Global rank 0's output goes to the console as it comes, unchanged (the node's log tailer echoes it).
Every other rank's complete lines reach node 0's agent (its own node's from its tailer, the other
nodes' over their presence connection: ``launcher/presence.py``) and are merged there: a line that
every rank prints identically is shown once (rank 0's copy); a line only some ranks print is shown
once with the rank set, ``[ranks 1,3-7] text``; a line that rank 0 printed too is not repeated.

A group of identical lines is shown as soon as every rank printed it; or, :data:`GRACE` after its
first copy arrived, once every rank not in it printed some other line from :data:`NEAR` seconds
before that (ranks running one script print in step: a warning only rank 5 prints goes out as soon
as the others printed their own line in its place); or at the latest :data:`WINDOW` seconds after
its first copy (quiet ranks). Groups
are shown in the order their first copy arrived, except that a group need not wait behind an
earlier one that has no rank in common with it: a rank's own lines keep their order. The full
per-rank files are kept as before; ``--console rank0`` shows rank 0 only.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

WINDOW = 0.25  # seconds a line waits for identical lines of the other ranks
GRACE = 0.03  # a line's group waits at least this long (a rank's lines read together arrive together)
NEAR = 0.1  # seconds: lines of the ranks arriving this close together were printed in the same step
LINE_LIMIT = 4096  # characters of one line shown (the file keeps all of it)
_CONTROL = {c: None for c in range(32) if c not in (9, 27)}  # C0 controls but tab and ESC (colours)


def rank_set(ranks: set[int] | list[int]) -> str:
    """``[rank 5]``, ``[ranks 1,3-7]``."""
    ordered = sorted(ranks)
    parts: list[str] = []
    start = prev = ordered[0]
    for rank in ordered[1:] + [None]:
        if rank is not None and rank == prev + 1:
            prev = rank
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if rank is not None:
            start = prev = rank
    return f"[rank{'s' if len(ordered) > 1 else ''} {','.join(parts)}]"


def clean(text: str) -> str:
    """A line as shown: bounded, without control characters that could rewrite the console."""
    text = text.translate(_CONTROL)
    return text if len(text) <= LINE_LIMIT else text[:LINE_LIMIT] + " [...]"


@dataclass
class _Group:
    text: str
    first: float
    ranks: set[int] = field(default_factory=set)


class ConsoleMerger(threading.Thread):
    """Node 0: merges the ranks' lines and prints them (see the module's docstring).

    Args:
        world: the job's number of ranks (:meth:`set_world` when an elastic job resizes).
        out: where merged lines go (the console's stdout).
        window: :data:`WINDOW`.
    """

    def __init__(self, world: int, out: TextIO | None = None, window: float = WINDOW):
        super().__init__(name="trainfleet-console", daemon=True)
        self.world, self.out, self.window = world, out or sys.stdout, window
        self.lock = threading.Lock()
        self.pending: list[_Group] = []
        self.latest: dict[int, float] = {}  # when each rank's latest line arrived
        self.shown = 0  # merged lines printed
        self._wake = threading.Event()
        self._halt = threading.Event()
        self.clock: Callable[[], float] = time.monotonic

    def set_world(self, world: int) -> None:
        with self.lock:
            self.world = world

    def add(self, rank: int, text: str) -> None:
        """A complete line of ``rank`` (rank 0's too: it was shown already, it only joins groups)."""
        if not 0 <= rank < max(self.world, 1):
            return
        now = self.clock()
        with self.lock:
            self.latest[rank] = now
            for group in self.pending:
                if group.text == text and rank not in group.ranks:
                    group.ranks.add(rank)
                    break
            else:
                self.pending.append(_Group(text, now, {rank}))
        self._wake.set()

    def _passed(self, group: _Group) -> bool:
        """Every rank not in ``group`` printed a line of its own near when its first copy arrived."""
        since = group.first - NEAR
        return all(self.latest.get(rank, -1e18) >= since for rank in range(self.world) if rank not in group.ranks)

    def _ready(self, now: float, final: bool) -> list[_Group]:
        """The groups to show now, in order, removed from ``pending``."""
        out: list[_Group] = []
        held: set[int] = set()  # ranks with an earlier line still waiting
        keep: list[_Group] = []
        for group in self.pending:
            age = now - group.first
            due = len(group.ranks) >= self.world or age >= self.window or (age >= GRACE and self._passed(group))
            if final or (due and not group.ranks & held):
                out.append(group)
            else:
                keep.append(group)
                held |= group.ranks
        self.pending = keep
        return out

    def flush(self, final: bool = False) -> None:
        with self.lock:
            ready = self._ready(self.clock(), final)
        lines = [f"{rank_set(g.ranks)} {clean(g.text)}\n" for g in ready if 0 not in g.ranks]
        if lines:
            self.shown += len(lines)
            try:
                self.out.write("".join(lines))
                self.out.flush()
            except (OSError, ValueError):
                pass

    def next_due(self) -> float | None:
        with self.lock:
            return min((g.first + (GRACE if self._passed(g) else self.window) for g in self.pending), default=None)

    def run(self) -> None:
        while not self._halt.is_set():
            due = self.next_due()
            wait = 0.5 if due is None else max(due - self.clock(), 0.0) + 0.001
            self._wake.wait(min(wait, 0.5))
            self._wake.clear()
            self.flush()

    def stop(self) -> None:
        """Show everything still waiting, then stop."""
        self._halt.set()
        self._wake.set()
        if self.is_alive():
            self.join(2.0)
        self.flush(final=True)

