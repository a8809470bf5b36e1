"""The engine's side of hang, desync and straggler diagnosis: what this rank is doing, published
into its progress record (:mod:`trainfleet.engine.progress_record`) for its agent to read.

Always on under ``launch`` (the record's path comes in ``contract.PROGRESS_FILE``); a plain
``python train.py`` has no board and pays nothing. Each phase change is a few stores into shared
memory (about a microsecond); a step's end also notes its signature (collectives issued on the
default group, batches fetched, the engine's own collectives) so ranks can be compared.

When the agent asks (a counter in the record), a thread of this process writes every thread's
Python stack, the collective this rank last issued and the one it waits in (torch's Flight
Recorder, which records gloo and NCCL collectives when ``TORCH_FR_BUFFER_SIZE`` is set, as
``launch`` does), to ``<record>.dump`` as JSON. A main thread stuck in C code that holds the GIL
cannot let that thread run: for it faulthandler writes the stacks at the C level, on
:data:`STACK_SIGNAL`, into ``<record>.stacks``.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable

from trainfleet.engine.progress_record import (
    ACCOUNT_KINDS,
    COLLECTIVE,
    DATA,
    FORWARD,
    IDLE,
    PHASES,
    ProgressRecord,
)


class DesyncError(RuntimeError):
    """Ranks are out of step (a skipped or extra step, a collective on some ranks only)."""


SIGNATURE = ("optimizer steps", "collectives issued", "batches fetched", "engine collectives")
STACK_SIGNAL = signal.SIGRTMIN + 4  # faulthandler's: registered before the record says the engine runs
POLL = 0.05  # how often the dump thread looks for a request


class ProgressBoard:
    """This rank's progress, as the agent sees it.

    Args:
        path: the record the launcher created.
        seq: returns the number of collectives issued on the default group so far (0 without one).
    """

    def __init__(self, path: str, seq: Callable[[], int]):
        self.record = ProgressRecord(path)
        self.path, self._seq = path, seq
        self.ticks = 0
        self.step = 0
        self.batches = 0  # from the engine's training loaders
        self.colls = 0  # the engine's own collectives
        self.stack = [IDLE]
        self.since = time.monotonic()
        self.step_started = self.since
        self.last = [0.0] * len(PHASES)
        self.total = [0.0] * len(PHASES)
        self.current = [0.0] * len(PHASES)  # this step so far
        self.step_time = 0.0
        self.nan_step = 0
        self.saves = 0
        self._loss: Any = None  # a CUDA loss is checked a step later, when reading it costs no wait
        # The account (the job's ledger): each second since the engine began in one kind. A step's
        # time runs from the previous step's end, less the saves, loads and evaluation inside it.
        self.account = dict.fromkeys(ACCOUNT_KINDS, 0.0)
        self.began = self.since
        self.interval_start = self.since
        self.excluded = 0.0
        self.counted = 0  # steps counted in the account (an in-place redo is recovery)
        self.base_step = -1  # the global step this process started from (resume; -1: not known)
        self._timing: list[str] = []  # the kinds being timed (only the outermost counts)
        self._timing_since = 0.0
        self._stacks_file = open(path + ".stacks", "w")  # noqa: SIM115 - faulthandler writes to it for our lifetime
        faulthandler.register(STACK_SIGNAL, file=self._stacks_file, all_threads=True, chain=False)
        self._write_account()
        self._publish()
        self._halt = threading.Event()
        threading.Thread(target=self._serve_dumps, name="trainfleet-progress", daemon=True).start()

    @classmethod
    def from_env(cls, path: str | None, seq: Callable[[], int]) -> "ProgressBoard | None":
        if not path:
            return None
        try:
            return cls(path, seq)
        except (OSError, ValueError) as err:  # diagnosis is a help, never a reason to fail a job
            print(f"trainfleet: no progress record ({err}); hang and straggler diagnosis is off for this rank",
                  file=sys.stderr)
            return None

    # ----- phases -----------------------------------------------------------------------------
    def _account(self) -> None:
        now = time.monotonic()
        self.current[self.stack[-1]] += now - self.since
        self.since = now

    def _publish(self) -> None:
        self.ticks += 1
        self.record.publish(self.ticks, self.step, self.stack[-1], self._seq_now(), self.batches, self.colls,
                            self.step_time)

    def _seq_now(self) -> int:
        try:
            return self._seq()
        except Exception:  # noqa: BLE001 - a torn-down group has no number
            return 0

    def enter(self, phase: int) -> None:
        """A nested phase (backward, optimizer, a collective, a checkpoint) begins."""
        self._account()
        self.stack.append(phase)
        if phase == COLLECTIVE:
            self.colls += 1
        self._publish()

    def leave(self) -> None:
        self._account()
        if len(self.stack) > 1:
            self.stack.pop()
        self._publish()

    def base(self, phase: int) -> None:
        """What the script does between the engine's calls: forward after a batch arrived, idle
        after a step."""
        self._account()
        self.stack[0] = phase
        self._publish()

    def tick(self) -> None:
        """Progress without a phase change (a forward call of the model, in evaluation too)."""
        self.ticks += 1
        self.record.publish(self.ticks, self.step, self.stack[-1], self._seq_now(), self.batches, self.colls,
                            self.step_time)

    def check_loss(self, loss: Any) -> None:
        """Note the first step whose loss is NaN or infinite (named by rank in the job's report;
        training goes on as before)."""
        if self.nan_step:
            return
        previous, self._loss = self._loss, None
        if previous is not None and not bool(previous.isfinite().all()):
            self.nan_step = self.step  # the step that computed it has completed since
        elif loss.device.type == "cpu":
            if not bool(loss.detach().isfinite().all()):
                self.nan_step = self.step + 1
        else:
            self._loss = loss.detach()
        if self.nan_step:
            self.record.set_nan_step(self.nan_step)

    def data_wait(self) -> None:
        self.base(DATA)

    def base_idle(self) -> None:
        self.base(IDLE)

    def batch_arrived(self, training: bool) -> None:
        if training:
            self.batches += 1
        self.base(FORWARD)

    # ----- the account (launcher/ledger.py) ----------------------------------------------------
    def _write_account(self) -> None:
        self.record.write_account(self.began, [self.account[k] for k in ACCOUNT_KINDS], self.counted, self.base_step)

    def begin(self, kind: str) -> None:
        """A save, load or evaluation begins; nested ones count in the outermost."""
        if not self._timing:
            self._timing_since = time.monotonic()
        self._timing.append(kind)

    def end(self) -> None:
        if not self._timing:
            return
        kind = self._timing.pop()
        if self._timing:
            return
        seconds = time.monotonic() - self._timing_since
        self.account[kind] += seconds
        self.excluded += seconds
        self._write_account()
        self._publish()

    def counters(self) -> list[int]:
        """What the signature of a save compares, but the group's own count: steps, batches, the
        engine's collectives, saves (a joining rank takes them from a peer: ``adopt``)."""
        return [self.step, self.batches, self.colls, self.saves]

    def adopt(self, counters: list[int], steps_ahead: int = 0) -> None:
        """A joining rank: a peer's :meth:`counters`, as they will be when this rank's loop begins
        (``steps_ahead``: the peer's step calls before its next batch)."""
        step, self.batches, self.colls, self.saves = (int(v) for v in counters)
        self.step = step + steps_ahead
        self._publish()

    def set_base(self, step: int) -> None:
        self.base_step = int(step)
        self._write_account()
        self._publish()

    def recovered(self, began: float, ended: float, step: int) -> None:
        """In-place recovery: the step in progress until the survivors' new places came (``began``)
        is lost (failure detection); ``began`` to ``ended`` is the recovery; the job goes on from
        global step ``step``."""
        self.base_step = step - self.counted
        self.account["detect"] += max(began - self.interval_start - self.excluded, 0.0)
        self.account["recover"] += max(ended - began, 0.0)
        self.interval_start, self.excluded = ended, 0.0
        self._write_account()
        self._publish()

    def step_done(self, counted: bool = True) -> None:
        """The optimizer stepped: the step's phase times and signature go into the record. A step
        not ``counted`` (an in-place recovery's redo) is recovery time in the account."""
        self._account()
        now = time.monotonic()
        interval = max(now - self.interval_start - self.excluded, 0.0)
        if counted:
            self.counted += 1
        self.account["recover" if not counted else "first" if self.counted == 1 else "steps"] += interval
        self.interval_start, self.excluded = now, 0.0
        self._write_account()
        self.step += 1
        self.step_time = now - self.step_started
        self.step_started = now
        self.last = self.current
        self.total = [t + c for t, c in zip(self.total, self.current)]
        self.current = [0.0] * len(PHASES)
        self.record.write_phase_times(self.last, self.total)
        self.record.write_ring(self.step, self._seq_now(), self.batches, self.colls)
        self.stack[0] = IDLE
        self._publish()

    def agree_before_save(self) -> None:
        """Before a checkpoint is written, every rank's signature (steps, collectives issued,
        batches fetched, the engine's collectives) must be rank 0's: an out-of-step job must not
        write a checkpoint that looks good. Through the process group's store, not a collective (an
        out-of-step rank's collective would pair with another one). Rank 0 checks every rank.

        Raises:
            DesyncError: naming the rank, the save and what differs; nothing is written.
        """
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        store = dist.distributed_c10d._get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
        self.saves += 1
        mine = [self.step, self._seq_now(), self.batches, self.colls]
        key = f"trainfleet/save{self.saves}/"
        store.set(key + str(rank), json.dumps(mine))
        for other in (range(1, world) if rank == 0 else [0]):
            store.wait([key + str(other)])
            theirs = json.loads(store.get(key + str(other)))
            if theirs != mine:
                odd, values, reference = (other, theirs, mine) if rank == 0 else (rank, mine, theirs)
                differs = ", ".join(f"{name} {a} (rank 0: {b})" for name, a, b in zip(SIGNATURE, values, reference)
                                    if a != b)
                raise DesyncError(f"rank {odd} is out of step with rank 0 at checkpoint #{self.saves}: {differs}; "
                                  "nothing was written. HINT: does every rank run the same steps and collectives "
                                  "(a `continue` or an all_reduce on some ranks only)?")

    # ----- dumps -------------------------------------------------------------------------------
    def _serve_dumps(self) -> None:
        done = 0
        while not self._halt.wait(POLL):
            try:
                wanted = self.record.dump_request()
            except ValueError:  # closed
                return
            if wanted != done:
                self._dump()
                done = wanted
                self.record.set_dump_done(done)

    def _dump(self) -> None:
        frames = sys._current_frames()
        main = threading.main_thread().ident
        threads = []
        for thread in threading.enumerate():
            frame = frames.get(thread.ident)
            if frame is None or thread.name == "trainfleet-progress":
                continue
            stack = [(f.filename, f.lineno, f.name) for f in traceback.extract_stack(frame)][::-1]  # innermost first
            threads.append({"name": thread.name, "main": thread.ident == main, "frames": stack[:40]})
        dump = {"pid": os.getpid(), "host": socket.gethostname(), "step": self.step, "phase": PHASES[self.stack[-1]],
                "seq": self._seq_now(), "pending": pending_collective(), "threads": threads}
        tmp = f"{self.path}.dump.tmp"
        with open(tmp, "w") as handle:
            json.dump(dump, handle)
        os.replace(tmp, self.path + ".dump")

    def close(self) -> None:
        self._halt.set()
        try:
            faulthandler.unregister(STACK_SIGNAL)
        except (ValueError, RuntimeError):
            pass


def pending_collective() -> dict[str, Any] | None:
    """The last collective this rank issued on any group, from torch's Flight Recorder: its op,
    sequence number and whether it completed; None where the recorder is off."""
    try:
        import pickle

        from torch._C._distributed_c10d import _dump_fr_trace

        entries = pickle.loads(_dump_fr_trace(True, True)).get("entries", [])
    except Exception:  # noqa: BLE001 - an older torch, no process group, the recorder off
        return None
    if not entries:
        return None
    last = entries[-1]
    return {"op": str(last.get("profiling_name", "?")).split(":", 1)[-1], "seq": last.get("collective_seq_id"),
            "state": last.get("state"), "group": str((last.get("process_group") or ("", ""))[1]),
            "sizes": last.get("input_sizes")}



def default_group_seq() -> int:
    """Collectives issued so far on the default process group (0 without one, e.g. Horovod)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.group.WORLD._get_sequence_number_for_group()
