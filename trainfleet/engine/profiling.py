"""Per-step timing for ``trainfleet bench``, switched on by its request in the worker contract
(:class:`trainfleet.engine.contract.BenchSettings`).

The engine sees every phase of a step through its own API, so it can time any
script written against it: *data* is the wait for the next batch, *forward* the time
from the batch's arrival to ``engine.backward``, *backward* and *optimizer* the
engine calls themselves, and *comm* the gradient all-reduce (DDP: from each bucket's
launch to its completion, which overlaps backward; Horovod: the wait in
``synchronize``). After the requested warm-up and timed steps each
rank writes its record and the run ends (SystemExit 0).
"""
from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from trainfleet.engine.contract import BenchSettings

PHASES = ("data", "forward", "backward", "comm", "optimizer")


class StepTimer:
    """Accumulates phase times per step and writes them when the budget is spent."""

    def __init__(self, out_dir: str, warmup: int, steps: int, rank: int, world_size: int):
        self.out_dir, self.warmup, self.steps = Path(out_dir), warmup, steps
        self.rank, self.world_size = rank, world_size
        self.records: list[dict[str, float]] = []
        self.current = dict.fromkeys(PHASES, 0.0)
        self.batch_arrived: float | None = None
        self.samples = 0
        self.device: Any = None
        self._open: list[str] = []  # phases being timed, innermost last
        self._step_start: float | None = None
        self.optimizer: Any = None  # set by Engine.step: its tensors give state_mb
        self.copy_bytes: Any = None  # set by Engine.step: the bytes of its state copy (engine/snapshot.py)
        self.comm_events: list[Any] = []  # (start, end) CUDA events of this step's all-reduces

    @classmethod
    def from_env(cls, rank: int, world_size: int) -> "StepTimer | None":
        told = BenchSettings.from_env()
        if not told.out:
            return None
        return cls(told.out, told.warmup, told.steps, rank, world_size)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] += seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block (CUDA work included: synchronised at both ends).

        Phases are exclusive: a phase timed inside another (Horovod's ``synchronize``
        inside the optimizer step) is taken out of the enclosing one.
        """
        self._sync()
        start = time.perf_counter()
        self._open.append(name)
        try:
            yield
        finally:
            self._sync()
            self._open.pop()
            elapsed = time.perf_counter() - start
            self.add(name, elapsed)
            if self._open:
                self.add(self._open[-1], -elapsed)

    def batch(self, waited: float, size: int) -> None:
        """A batch arrived after ``waited`` seconds; the forward pass starts now."""
        self.add("data", waited)
        self.samples = size
        self.batch_arrived = time.perf_counter()
        if self._step_start is None:
            self._step_start = self.batch_arrived - waited

    def forward_done(self) -> None:
        """``engine.backward`` was called: everything since the batch arrived is forward."""
        if self.batch_arrived is not None:
            self._sync()
            self.add("forward", time.perf_counter() - self.batch_arrived)
            self.batch_arrived = None

    def step_done(self) -> None:
        """The optimizer step ended: close the step, and finish the run when the budget is spent."""
        if self.comm_events:  # the optimizer phase ended with a device sync: every event has happened
            self.add("comm", sum(start.elapsed_time(end) for start, end in self.comm_events) / 1000)
            self.comm_events.clear()
        self.current["samples"] = float(self.samples)
        now = time.perf_counter()
        self.current["wall"] = now - (self._step_start if self._step_start is not None else now)
        self._step_start = None
        self.records.append(self.current)
        self.current = dict.fromkeys(PHASES, 0.0)
        if len(self.records) >= self.warmup + self.steps:
            self.write()
            sys.stdout.flush()
            raise SystemExit(0)

    def state_mb(self) -> float | None:
        """MB this rank holds of parameters and optimizer state (its shards only, under fsdp)."""
        if self.optimizer is None:
            return None
        tensors = [p for g in self.optimizer.param_groups for p in g["params"]]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if hasattr(v, "numel")]
        local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
        return sum(t.numel() * t.element_size() for t in local) / 2**20

    def write(self) -> None:
        """Write this rank's record: per-step phases after warm-up, peak memory."""
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self.device is not None and self.device.type == "cuda":
            import torch

            peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.out_dir.mkdir(parents=True, exist_ok=True)
        on_cuda = self.device is not None and self.device.type == "cuda"
        record = {"rank": self.rank, "world_size": self.world_size, "steps": self.records[self.warmup:],
                  "peak_mb": peak_mb, "state_mb": self.state_mb(),
                  "copy_mb": self.copy_bytes() / 2**20 if self.copy_bytes is not None else None,
                  "memory": "cuda allocated" if on_cuda else "max RSS"}
        (self.out_dir / f"rank{self.rank}.json").write_text(json.dumps(record))


def timed_allreduce_hook(timer: StepTimer):
    """A DDP comm hook: the default all-reduce (mean), timed from launch to completion. On CUDA
    the time is between two CUDA events: NCCL's future completes on the host as soon as the
    all-reduce is queued, so a host clock would read about 0."""
    import torch
    import torch.distributed as dist

    # No annotations: DDP checks them against dist.GradBucket, and under
    # `from __future__ import annotations` they would be strings.
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        tensor = bucket.buffer().div_(dist.get_world_size())
        start: Any = time.perf_counter()
        if tensor.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()  # NCCL's stream waits for this stream, so the all-reduce starts after it
        future = dist.all_reduce(tensor, async_op=True).get_future()

        def done(fut):  # type: ignore[no-untyped-def]
            if isinstance(start, float):
                timer.add("comm", time.perf_counter() - start)
            else:  # the callback's current stream is synchronised with the all-reduce's kernels
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                timer.comm_events.append((start, end))
            return fut.value()[0]

        return future.then(done)

    return hook
