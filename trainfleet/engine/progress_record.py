"""A rank's progress record: a small file in its node's log folder, mapped into memory by the
worker (which writes it as it trains) and by its agent (which reads it), torch-free.

The launcher creates one per worker and names it in ``contract.PROGRESS_FILE``; the engine writes
it at every phase change (a few stores into shared memory, no system call, no collective). The agent
reads it every poll to tell a hang, a desynchronised rank and a straggler (``launcher/diagnosis.py``).

Layout (little-endian, fixed size): a header, the per-phase seconds of the last completed step and
in total, then a ring of the last :data:`RING` steps' signatures: (step, collectives issued on the
default process group, batches fetched from the engine's training loaders, the engine's own
collectives). Ranks of one job must agree on a step's signature; a rank that skipped a step or
made an extra all-reduce does not.

Torn reads: the writer bumps ``ticks`` last, after the fields it changed; a reader that sees the
same ticks before and after its copy has a consistent one (it retries otherwise).
"""
from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

MAGIC = 0x54465031  # "TFP1"
# what a rank is doing; IDLE is the script's own code between the engine's calls
PHASES = ("idle", "data", "forward", "backward", "optimizer", "collective", "checkpoint")
IDLE, DATA, FORWARD, BACKWARD, OPTIMIZER, COLLECTIVE, CHECKPOINT = range(len(PHASES))
RING = 16
# offset 0: magic pid ticks tick_time step phase | 36: dump_req (the agent's) dump_done (the worker's)
# nan_step (the first step whose loss was not finite, 0: none) | 48: seq batches colls step_time
_HEADER = struct.Struct("<IIQdQIIIIQQQd")
_HEAD_A = struct.Struct("<IIQdQI")  # written last, ticks in it
_HEAD_B = struct.Struct("<QQQd")
DUMP_REQ_AT, DUMP_DONE_AT, NAN_STEP_AT, HEAD_B_AT = 36, 40, 44, 48
_PHASE_TIMES = struct.Struct(f"<{len(PHASES)}d")
_ENTRY = struct.Struct("<QQQQ")
LAST_AT = _HEADER.size
TOTAL_AT = LAST_AT + _PHASE_TIMES.size
RING_AT = TOTAL_AT + _PHASE_TIMES.size
# The rank's account (the job's ledger, launcher/ledger.py): seconds since the engine began, each in
# one kind, plus when it began (time.monotonic()), the steps it counted and the global step it
# started from (-1: not known).
ACCOUNT_KINDS = ("first", "steps", "save", "load", "eval", "detect", "recover")
_ACCOUNT = struct.Struct(f"<d{len(ACCOUNT_KINDS)}dqq")
ACCOUNT_AT = RING_AT + RING * _ENTRY.size
SIZE = ACCOUNT_AT + _ACCOUNT.size


@dataclass
class Snapshot:
    """One consistent read of a record."""

    pid: int
    ticks: int
    tick_time: float  # time.monotonic() of the last tick (the host's clock, shared by its processes)
    step: int  # optimizer steps completed
    phase: str
    dump_req: int
    dump_done: int
    nan_step: int  # the first step whose loss was NaN or infinite on this rank, 0: none
    seq: int  # collectives issued on the default group, at the last step's end
    batches: int
    colls: int
    step_time: float  # seconds of the last step, end to end
    last: dict[str, float]  # seconds in each phase during the last step
    total: dict[str, float]  # seconds in each phase since the record began
    ring: list[tuple[int, int, int, int]]  # (step, seq, batches, colls), oldest first
    account: dict[str, float] | None = None  # began, the ACCOUNT_KINDS' seconds, count, base (None: no engine)


def create(path: str) -> None:
    """The launcher: a zeroed record, owned by us, not through a link (its folder is made 0700).

    A record of the right size is zeroed where it is, never truncated: a worker that goes on in
    place keeps it mapped, and touching a mapped page past a truncated file's end is SIGBUS (the
    agent made the in-place attempt's records while rank 0 wrote its own: the job died, signal 7)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_size == SIZE:
            os.pwrite(fd, bytes(SIZE), 0)
        else:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, SIZE)
    finally:
        os.close(fd)


class ProgressRecord:
    """A mapped record; the worker writes (:meth:`publish` & co), the agent reads and asks for dumps."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size != SIZE:
                raise ValueError(f"{path}: not a progress record ({os.fstat(fd).st_size} bytes, expected {SIZE})")
            self.map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.map.close()

    # ----- the worker -------------------------------------------------------------------------
    def publish(self, ticks: int, step: int, phase: int, seq: int, batches: int, colls: int, step_time: float) -> None:
        """The header; ``ticks`` is written last (see the module's note on torn reads)."""
        _HEAD_B.pack_into(self.map, HEAD_B_AT, seq, batches, colls, step_time)
        _HEAD_A.pack_into(self.map, 0, MAGIC, os.getpid(), ticks, time.monotonic(), step, phase)

    def write_phase_times(self, last: list[float], total: list[float]) -> None:
        _PHASE_TIMES.pack_into(self.map, LAST_AT, *last)
        _PHASE_TIMES.pack_into(self.map, TOTAL_AT, *total)

    def write_ring(self, step: int, seq: int, batches: int, colls: int) -> None:
        _ENTRY.pack_into(self.map, RING_AT + (step % RING) * _ENTRY.size, step, seq, batches, colls)

    def write_account(self, began: float, seconds: list[float], steps: int, base: int) -> None:
        """The rank's account; the caller publishes (bumps ``ticks``) after it."""
        _ACCOUNT.pack_into(self.map, ACCOUNT_AT, began, *seconds, steps, base)

    def dump_request(self) -> int:
        return struct.unpack_from("<I", self.map, DUMP_REQ_AT)[0]

    def set_nan_step(self, step: int) -> None:
        struct.pack_into("<I", self.map, NAN_STEP_AT, step)

    def set_dump_done(self, value: int) -> None:
        struct.pack_into("<I", self.map, DUMP_DONE_AT, value)

    # ----- the agent --------------------------------------------------------------------------
    def request_dump(self) -> int:
        """Ask the worker for its stacks; returns the request number to wait for in ``dump_done``."""
        value = self.dump_request() + 1
        struct.pack_into("<I", self.map, DUMP_REQ_AT, value)
        return value

    def read(self) -> Snapshot | None:
        """A consistent snapshot, or None before the worker's engine wrote one."""
        for _ in range(20):
            raw = bytes(self.map[:SIZE])
            head = _HEADER.unpack_from(raw, 0)
            if head[0] != MAGIC:
                return None
            if struct.unpack_from("<Q", self.map, 8)[0] != head[2]:
                continue  # written meanwhile
            last = dict(zip(PHASES, _PHASE_TIMES.unpack_from(raw, LAST_AT)))
            total = dict(zip(PHASES, _PHASE_TIMES.unpack_from(raw, TOTAL_AT)))
            entries = [_ENTRY.unpack_from(raw, RING_AT + i * _ENTRY.size) for i in range(RING)]
            ring = sorted(e for e in entries if e[0] > 0)
            phase = PHASES[head[5]] if head[5] < len(PHASES) else "?"
            values = _ACCOUNT.unpack_from(raw, ACCOUNT_AT)
            account = None
            if values[0] > 0:
                account = {"began": values[0], **dict(zip(ACCOUNT_KINDS, values[1:-2])), "count": values[-2],
                           "base": values[-1]}
            return Snapshot(head[1], head[2], head[3], head[4], phase, head[6], head[7], head[8], head[9], head[10],
                            head[11], head[12], last, total, ring, account)
        return None
