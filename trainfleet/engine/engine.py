"""The ``Engine``: the one object a training script talks to. Its checkpoint methods (``save``,
``load``, ``resume``, ``state_dict``) live in :mod:`trainfleet.engine.checkpoint.checkpointer`."""
from __future__ import annotations

import atexit
import contextlib
import os
import random
import signal
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch.utils.data import Dataset

from trainfleet.engine.checkpoint.checkpointer import CheckpointMixin
from trainfleet.engine.checkpoint.files import AsyncSaver
from trainfleet.engine.checkpoint.sharded import ShardedCheckpointer
from trainfleet.engine.checkpoint.training_state import restore_rng
from trainfleet.engine.contract import ElasticSettings, WorkerSettings
from trainfleet.engine.data import (
    DeviceDataLoader,
    GlobalOrderSampler,
    build_loader,
    elastic_global_batch,
    resolve_batch_sizes,
)
from trainfleet.engine.environment import ElasticInfo, data_step, note_resume
from trainfleet.engine.precision import build_precision
from trainfleet.engine.profiling import StepTimer
from trainfleet.engine.progress import ProgressBoard, default_group_seq
from trainfleet.engine.progress_record import BACKWARD, COLLECTIVE, OPTIMIZER
from trainfleet.engine.recovery import (
    Handshake,
    InPlaceImpossible,
    Watcher,
    cut,
    device_fault,
    lost_a_peer,
    rebuild_ddp_in_place,
)
from trainfleet.engine.replicas import ShardRing
from trainfleet.engine.snapshot import NonFiniteLossError, Rollback, StateSnapshot
from trainfleet.engine.strategy import Strategy, build_strategy
from trainfleet.utils.errors import UsageError
from trainfleet.utils.process import EARLY_SIGNALS

STOP_REQUEST_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


BACKWARD_CALL = "backward (gradient all-reduce)"
# the strategies whose replicated state goes on in place after a lost node (fsdp too: recovers_in_place)
REPLICATED_IN_PLACE = ("ddp", "horovod")
MID_STEP = ("backward", "forward", "step")  # where a recovery leaves the iteration's batch to be trained again
JOIN_FLAG = 1 << 8  # above every signal number: should_stop's agreement that a node joins in place


class CollectiveTimeoutError(RuntimeError):
    """A collective timed out; the message names the rank and the call site."""


@dataclass(frozen=True)
class _Output:
    """A forward output's shape (fsdp in place: what a forward that recovered returns, as zeros)."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "_Output":
        return cls(tuple(tensor.shape), tensor.dtype, tensor.device)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device, requires_grad=self.dtype.is_floating_point)


def _call_site() -> str:
    """``file:line (function)`` of the first caller outside trainfleet and contextlib."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_PACKAGE_DIR) and "contextlib" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "<unknown>"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (when installed) and torch identically on every rank."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:  # numpy is optional for the engine
        return
    numpy.random.seed(seed % 2**32)


class Engine(CheckpointMixin):
    """Runs a training script under one strategy and precision.

    Args:
        strategy: a name (``single``, ``dp``, ``ddp``) or a Strategy; defaults to what
            ``launch --strategy`` said (:mod:`trainfleet.engine.contract`), else ``ddp`` under a
            launcher and ``single`` for a plain ``python train.py``.
        precision: a name (``32``, ``bf16``, ``16-mixed``, ``O0``-``O3``) or a Precision;
            defaults to ``launch --precision``.
        seed: seeds Python, NumPy and torch on every rank alike.
        accelerator: ``auto``, ``cpu`` or ``cuda``; defaults to what the launcher chose.
        amp_backend: ``native`` (torch.amp, the default) or ``apex``; ``launch --amp-backend``.
        on_nan: ``report`` (the default: a NaN/inf loss is named by rank, training goes on) or
            ``rollback``: every rank returns to the last step, held in memory, and drops that
            batch; ``launch --on-nan``.
        max_rollbacks: with ``rollback``, how many are allowed before a non-finite loss raises
            :class:`~trainfleet.engine.snapshot.NonFiniteLossError` (default 3; ``--max-rollbacks``).
        **strategy_kwargs: passed to the strategy (``find_unused_parameters=True``, fsdp's
            ``wrap=``, ...); under ``launch`` they default to ``--strategy-opt``.
    """

    def __init__(self, strategy: str | Strategy | None = None, precision: Any = None,
                 seed: int = 0, accelerator: str | None = None, amp_backend: str | None = None,
                 on_nan: str | None = None, max_rollbacks: int | None = None, **strategy_kwargs: Any):
        told = WorkerSettings.from_env()  # what launch said; all None in a plain script
        if strategy is None and not strategy_kwargs and told.strategy_options:
            strategy_kwargs = dict(told.strategy_options)
        if not isinstance(strategy, Strategy):
            precision = build_precision(precision or told.precision, amp_backend or told.amp_backend)
        self.strategy = build_strategy(
            strategy or told.strategy,
            precision=precision,
            accelerator=accelerator or told.accelerator,
            **strategy_kwargs,
        )
        self.seed = seed
        self._saver = AsyncSaver()
        self._step_hooked: weakref.WeakSet = weakref.WeakSet()  # optimizers whose steps wait for a save's copies
        seed_everything(seed)
        # a node joining a running elastic ddp job in place: the group is made in setup(), once the script
        # built its model; its agent tells node 0 when every worker is there, and the survivors then make the
        # group with it (engine/recovery.py), so they stop only for the group and the state, not the start-up
        # fsdp: in place, a lost node's shards come from a copy on the next node or another shard group
        self._sharded_in_place = getattr(self.strategy, "recovers_in_place", False)
        joins_in_place = self.strategy.name in REPLICATED_IN_PLACE or self._sharded_in_place
        self._joining = bool(told.joining and told.recovery and joins_in_place)
        self._joined: tuple[int, float] | None = None  # (the step, when) a joining rank received in setup()
        self._resumes = False  # the script called resume(): where a joining rank takes its peers' state
        self._said_joinable = False
        if not self._joining:
            self.strategy.setup_environment()
        self._sharded = ShardedCheckpointer(self.strategy, self._saver)
        self.stop_signal: int | None = None  # the signal behind a stop request, once agreed
        self._pending_signal: int | None = None
        if told.under_launch and threading.current_thread() is threading.main_thread():
            for signum in STOP_REQUEST_SIGNALS:  # only under launch: a plain script keeps Python's defaults
                signal.signal(signum, self._on_signal)
            self._pending_signal = EARLY_SIGNALS[-1] if EARLY_SIGNALS else None  # came before this Engine
        self.elastic = ElasticInfo.from_env() if told.under_launch else None  # launch --nodes MIN:MAX
        # under launch: what this rank is doing, for its agent's hang/desync/straggler diagnosis
        self.progress = ProgressBoard.from_env(told.progress_file, default_group_seq)
        self.rollback = Rollback.from_setting(on_nan or told.on_nan,
                                              told.max_rollbacks if max_rollbacks is None else max_rollbacks)
        self.snapshot = StateSnapshot()  # the last step's state in host memory (with rollback on)
        self._trained: tuple[Any, Any] | None = None  # (model, optimizer) of setup()
        self._scheduler: Any = None  # the script's scheduler, once given to resume() (a joining rank needs it)
        self._steps = 0  # calls of step(): the training steps so far, rolled-back ones included
        self._join_seen = -1  # the attempt of the last join the watcher saw (said at the next should_stop)
        self._join_next = False  # every rank agreed a join: the next backward() moves to the new group
        # an elastic ddp, Horovod or fsdp job: a lost node does not end this process (engine/recovery.py)
        self.in_place = Handshake(told.recovery) if told.recovery and joins_in_place else None
        # each step's shards go on to the next node too (one shard per rank; hybrid's groups hold replicas)
        self.copies_shards = self.in_place is not None and self._sharded_in_place \
            and not self.strategy.replicates_shards
        self._ring: ShardRing | None = None  # ... through this rank's side of the ring (engine/replicas.py)
        self._last_output: Any = None  # fsdp in place: the last forward's output shapes (_guard_forward)
        self._redo: str | None = None  # after an in-place recovery: what step() does with this iteration
        self._loaders: list[DeviceDataLoader] = []  # every loader (resharded after an in-place recovery)
        # the state after each step, in host memory: what a rollback or an in-place recovery returns to
        self.keep_snapshot = self.rollback is not None or self.in_place is not None
        self._watcher = None
        if self.in_place is not None and hasattr(self.strategy, "superseded"):  # its group's store may close
            self.strategy.superseded = lambda: self.in_place.newer(self.restart_count) is not None
        if self.in_place is not None:  # the agent's answer can come before this rank's own error
            self._watcher = Watcher(self.in_place, lambda: self.restart_count, self._on_answer)
            self._watcher.start()
        self.timer = StepTimer.from_env(self.rank, self.world_size)  # trainfleet bench only
        if self.timer is not None:
            self.timer.device = self.device
            self.strategy.timer = self.timer
        atexit.register(self._close_at_exit)

    # ----- where we are --------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.strategy.rank

    @property
    def local_rank(self) -> int:
        return self.strategy.local_rank

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def device(self) -> torch.device:
        return self.strategy.root_device

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.strategy.is_global_zero

    @property
    def precision(self):
        return self.strategy.precision

    @property
    def world_changed(self) -> bool:
        """True in an elastic job's attempt that runs on other nodes than the one before (a node
        was lost or joined): :meth:`resume` continues at this world size, same global batch."""
        return self.elastic is not None and self.elastic.world_changed

    @property
    def restart_count(self) -> int:
        """Attempts of this job before this one (torchrun's TORCHELASTIC_RESTART_COUNT)."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)

    # ----- setup ---------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Move ``model`` to the device and wrap it; wrap ``optimizer`` if the strategy needs to.

        Returns:
            ``(model, optimizer)`` when an optimizer is given, else the model.
        """
        if optimizer is not None:
            self.strategy.check_optimizer(optimizer)
        if self._joining:  # the survivors make the new group with this rank now
            self.in_place.say_ready()
            self.strategy.setup_environment()
            self.strategy.joining = True  # (fsdp: no broadcast of rank 0's weights; the state comes in whole)
        model, optimizer = self.precision.connect(model, optimizer)
        model = self.strategy.setup_module(model)
        if self.progress is not None:  # every forward call is progress, evaluation's too
            model.register_forward_pre_hook(lambda _module, _inputs: self.progress and self.progress.tick())
        if self.in_place is not None and self._sharded_in_place:
            self._guard_forward(model)
        if optimizer is None:
            self._trained = (model, None)
            self._receive_from_peers()
            return model
        optimizer = self.strategy.setup_optimizer(optimizer)
        # an asynchronous save copies this optimizer's parameters and state during the next forward and
        # backward (AsyncSaver): its step, the only thing that writes them, waits for those copies first
        optimizer.register_step_pre_hook(self._before_optimizer_step)
        self._step_hooked.add(optimizer)
        self._trained = (model, optimizer)
        self._receive_from_peers()
        return model, optimizer

    def _before_optimizer_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        """The optimizer's step pre-hook: an asynchronous save's copies of its tensors land first
        (a wait that counts as the save's in the rank's account: the job's checkpoint stalls)."""
        if self._saver.staging() and self.progress is not None:
            self.progress.begin("save")
            try:
                self._saver.wait_staged()
            finally:
                self.progress.end()
        else:
            self._saver.wait_staged()

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The user's module inside the strategy's wrappers."""
        return self.strategy.unwrap(model)

    def dataloader(self, dataset: Dataset, batch_size: int | None = None,
                   global_batch_size: int | None = None, shuffle: bool = True, seed: int | None = None,
                   drop_last: bool = False, even: bool | None = None, num_workers: int = 0,
                   collate_fn: Any = None, **loader_kwargs: Any) -> DeviceDataLoader:
        """A sharded loader whose batches arrive on :attr:`device`.

        Give the per-worker ``batch_size`` or the ``global_batch_size`` (which must
        divide by the world size). The sample order depends only on ``seed`` and the
        epoch, and each new pass over the loader is the next epoch.

        Args:
            even: pad the last partial global batch so every rank gets the same number of
                samples; defaults to ``shuffle`` (training). Use False for evaluation.
        """
        if self.elastic is not None:  # one global batch at every size the job may shrink or grow to
            e = self.elastic
            global_batch_size = elastic_global_batch(batch_size, global_batch_size, e.world_sizes, f"{e.low}:{e.high}")
            batch_size = None
        _, global_batch = resolve_batch_sizes(batch_size, global_batch_size, self.world_size)
        sampler = GlobalOrderSampler(
            len(dataset), global_batch, self.world_size, self.rank, shuffle=shuffle,
            seed=self.seed if seed is None else seed, drop_last=drop_last,
            even=shuffle if even is None else even,
        )
        loader = build_loader(dataset, sampler, self.device, num_workers, collate_fn, self.timer, loader_kwargs,
                              board=self.progress)
        self._loaders.append(loader)
        if sampler.even:
            if self.rollback is not None or self.in_place is not None:  # the state before the first step
                loader.on_start = self._first_snapshot
        return loader

    # ----- the step ------------------------------------------------------------------
    def autocast(self) -> ContextManager[Any]:
        """Context for the forward pass under the configured precision."""
        return self.precision.forward_context()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` through the precision (loss scaling) and strategy."""
        if self._join_next:  # agreed at the last should_stop: a node joins; this batch is trained again with it
            self._join_next = False
            self._recover(None, "backward")
            return
        if self._redo is not None:  # recovered in place in this iteration's forward (or an earlier backward)
            return
        if self.progress is not None:
            self.progress.check_loss(loss)
        if self.rollback is not None and self._non_finite_anywhere(loss):
            return  # no gradients: step() returns every rank to the last step and drops this batch
        with self._collective(BACKWARD_CALL, BACKWARD):
            if self.timer is None:
                self.strategy.backward(loss)
                return
            self.timer.forward_done()
            with self.timer.phase("backward"):
                self.strategy.backward(loss)

    def step(self, optimizer: torch.optim.Optimizer, zero_grad: bool = True) -> bool:
        """Optimizer step, then zero the gradients. Returns False if the step was skipped (a
        half-precision overflow, or ``on_nan="rollback"`` dropped this batch)."""
        if self._redo is not None:  # an in-place recovery interrupted this iteration
            redo, self._redo = self._redo, None
            if self.progress is not None:
                self.progress.step_done(counted=False)
            return redo == "done"  # done: a peer's state of this step was taken; else train the batch again
        if self.rollback is not None and self.rollback.pending is not None:
            self._steps += 1
            self._roll_back(optimizer)
            if self.progress is not None:
                self.progress.step_done()
            return False
        try:
            with self.timer.phase("optimizer") if self.timer is not None else contextlib.nullcontext(), \
                    self._phase(OPTIMIZER):
                stepped = self.strategy.optimizer_step(optimizer)
                if zero_grad:
                    self.strategy.zero_grad(optimizer)
        except RuntimeError as err:  # Horovod's gradient all-reduces end in the step (synchronize): nothing applied
            if self.in_place is None or not lost_a_peer(err):
                raise
            self._recover(err, "step")
            return self.step(optimizer, zero_grad)  # (as after a recovery in the backward: _redo says what)
        self._steps += 1
        if self.keep_snapshot:
            self._capture(optimizer)
        if self.progress is not None:
            self.progress.step_done()
        if self.timer is not None:
            self.timer.optimizer = optimizer
            self.timer.copy_bytes = self._copy_bytes
            self.timer.step_done()
        return stepped

    def no_sync(self, model: torch.nn.Module) -> ContextManager[Any]:
        """Skip gradient synchronisation inside (accumulate, then step outside)."""
        return self.strategy.no_backward_sync(model)

    # ----- the state in memory (engine/snapshot.py) -------------------------------------
    @property
    def _train_loaders(self) -> list[DeviceDataLoader]:
        """The even loaders (training): their position is part of the state."""
        return [loader for loader in self._loaders if loader.sampler.even]

    def _capture(self, optimizer: torch.optim.Optimizer) -> None:
        model = self._trained[0] if self._trained is not None else None
        if model is None:
            raise UsageError("on_nan='rollback' needs the model from engine.setup(model, optimizer): the "
                             "engine returns to its state.", "call engine.setup() before training.")
        self.snapshot.capture(self._steps, model, optimizer, self.precision, self._rng(), self._train_loaders)
        if self.copies_shards and optimizer is not None:
            from trainfleet.engine.fsdp import shard_pieces

            if self._ring is None:  # (again after a recovery: the ring of the new world)
                self._ring = ShardRing(self.rank, self.world_size, self.strategy.env.local_world_size,
                                       self.strategy.timeout_s)
            self._ring.push(self._steps, shard_pieces(model, optimizer)[0])

    def _copy_bytes(self) -> int:
        """Host memory of the state copy: the one kept, or (with the copy off, as in a plain bench run)
        what one capture would hold, taken once when the bench writes its record."""
        if self.snapshot.step is not None:
            return self.snapshot.nbytes() + (self._ring.nbytes() if self._ring is not None else 0)
        if self._trained is None or self._trained[1] is None:
            return 0
        probe = StateSnapshot()
        probe.capture(self._steps, self._trained[0], self._trained[1], self.precision, self._rng(), self._train_loaders)
        ring = 0
        if self._sharded_in_place and not self.strategy.replicates_shards \
                and self.world_size > self.strategy.env.local_world_size:
            from trainfleet.engine.fsdp import (
                shard_pieces,  # an elastic run copies its shards to the next node
            )

            ring = ShardRing.nbytes_for(shard_pieces(*self._trained)[0])
        return probe.nbytes() + ring

    def _first_snapshot(self) -> None:
        if self.snapshot.step is None and self._trained is not None and self._trained[1] is not None:
            self._capture(self._trained[1])

    def _non_finite_anywhere(self, loss: torch.Tensor) -> bool:
        """Whether any rank's loss is NaN/inf (one small all-reduce: every rank must agree)."""
        mine = not bool(loss.detach().isfinite().all())
        flags = torch.zeros(self.world_size, dtype=torch.float32)
        flags[self.rank] = float(mine)
        with self._collective("rollback check"):
            flags = self.strategy.all_reduce(flags, "sum").cpu()
        ranks = [rank for rank, flag in enumerate(flags.tolist()) if flag]
        if ranks:
            self.rollback.pending = ranks
        return bool(ranks)

    def _roll_back(self, optimizer: torch.optim.Optimizer) -> None:
        """Every rank: back to the last step's state; the batch just read stays consumed."""
        rollback, ranks = self.rollback, self.rollback.pending
        rollback.pending = None
        self._saver.wait_staged()  # (the restore overwrites what an asynchronous save may still be copying)
        step = self._steps
        names = ", ".join(str(rank) for rank in ranks)
        if rollback.done >= rollback.limit:
            raise NonFiniteLossError(
                f"rank {self.rank}: non-finite loss on rank(s) {names} at step {step}, after {rollback.done} "
                f"rollback(s) (the limit, --max-rollbacks {rollback.limit}). HINT: lower the learning rate, "
                "check the data of these steps, or raise --max-rollbacks.")
        self.strategy.zero_grad(optimizer)
        model = self._trained[0] if self._trained is not None else None
        if self.snapshot.step is None:
            raise NonFiniteLossError(f"rank {self.rank}: non-finite loss on rank(s) {names} at step {step}, "
                                     "before any state was held to return to (the loader was not iterated).")
        self.snapshot.restore(model, optimizer, self.precision, lambda rng: restore_rng(rng, self.device))
        rollback.done += 1
        rollback.history.append((step, ranks))
        self.print(f"trainfleet: rollback {rollback.done} of {rollback.limit}: non-finite loss on rank(s) {names} "
                   f"at step {step}; every rank returned to the state after step {self.snapshot.step} and dropped that "
                   "batch.")

    # ----- in-place recovery (engine/recovery.py) -----------------------------------------
    def _recover(self, err: RuntimeError | None, where: str) -> None:
        """A peer was lost in this step's collectives: join the survivors' new group and go on
        from the latest step any of them completed; raise ``err`` where that cannot be done.
        ``err`` None: no peer was lost, a node joins (every rank agreed it at ``should_stop``)."""
        from trainfleet.engine.environment import ClusterEnvironment

        attempt = self.restart_count
        model, optimizer = self._trained if self._trained is not None else (None, None)
        cannot = err or RuntimeError(f"rank {self.rank}: a node joins in place, but this rank holds no state to "
                                     "give it (engine.setup(model, optimizer) and one step are needed)")
        if model is None or optimizer is None or self.snapshot.step is None:
            raise cannot
        self._saver.wait_staged()  # (the state put in place overwrites what a save may still be copying)
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.settle()  # a copy still arriving from the previous node completes first (a moment at most)
        old_rank, old_world = self.rank, self.world_size
        self.strategy.abandon_group()  # at once: a survivor waiting on this rank fails too, and says so
        self._sharded.close()  # its checkpoint group went with the old group: a sharded save makes a new one
        fault = device_fault(self.strategy.root_device)  # (the aborted group's kernels have ended)
        if fault is not None:  # this process cannot go on: every node's workers start again
            raise InPlaceImpossible(f"rank {self.rank}: {fault}, so its process cannot be reused") from cannot
        if err is not None:
            self.in_place.say_lost(attempt, self._steps, where)
        place = self.in_place.wait_next(attempt)
        if place is None:
            raise cannot
        began = time.monotonic()
        strategy = self.strategy
        wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        retried = False
        while True:
            if wrapped:  # the old reducer holds the old group (and its sockets to the peers) alive
                model.reducer = model.logger = model.process_group = None
            strategy.abandon_group()
            os.environ.update(place["env"])
            strategy.env = ClusterEnvironment.from_env()
            try:
                strategy.setup_environment()
                if wrapped:
                    rebuild_ddp_in_place(model, strategy.wrap_again)
                if wrapped or strategy.name == "horovod":  # as a joining rank's setup() does (O2's masters)
                    strategy._share_masters()
                if self._sharded_in_place:
                    strategy.new_mesh()  # (as a joining rank's setup made it, before the same agreement)
                    newest, behind, joined = self._agree_shards(model, optimizer, err, ring, old_rank, old_world,
                                                                joining=False)
                else:
                    newest, behind, joined = self._agree_state(model, optimizer, where, err, joining=False)
                break
            except RuntimeError as again:  # a member of the new group went away before it was made (a joiner)
                if not lost_a_peer(again):
                    raise
                retried = True
                place = self.in_place.wait_next(int(place["attempt"]))  # the agents' next answer (the watcher cut)
                if place is None:
                    raise cannot from again
        self._take_state(model, optimizer, newest)
        self._redo = ("done" if behind else "again") if where in MID_STEP else None
        if self.progress is not None:
            self.progress.recovered(began, time.monotonic(), newest)
        record = ElasticSettings.from_env().resume_record
        if self.is_main and record:  # the launcher's report: where the new attempt went on from
            note_resume(record, None, self._train_loaders[0] if self._train_loaders else None, in_place=newest)
        what = "lost a peer" if err is not None else "a joining node went away" if retried else "a node joined"
        self.print(f"trainfleet: {what} at step {newest}; recovered in place in {time.monotonic() - began:.2f}s "
                   f"at world size {self.world_size}: going on from step {newest}"
                   f"{' (a rank one step behind took it from a peer)' if behind else ''}"
                   f"{' (the joining ranks took it from this memory)' if joined else ''} (met {where}).")

    def _on_answer(self, place: dict) -> bool:
        """The watcher's (True: done with this answer): a node lost, cut the old group now; a node
        joins, say so at the next ``should_stop`` (every rank agrees there, and all move at the next
        ``backward``, where the joining ranks' loop begins too: cutting the group mid-step could
        leave the survivors in a save or one step ahead, and the joiners in neither)."""
        if place.get("join"):
            self._join_seen = int(place["attempt"])
            return True
        live = getattr(self.strategy, "live_sockets", None)
        sockets = live() if live is not None else set()
        ring = self._ring
        if ring is not None:  # fsdp: a wait for a shard copy to go out fails too (a frozen peer never takes it)
            sockets |= ring.sockets
        # nothing to cut yet (between groups: this rank is on its way to an earlier answer): asked again, so a
        # group it then waits to make with a member that is gone is cut too
        return cut(sockets) > 0

    def _agree_state(self, model: Any, optimizer: Any, where: str, err: BaseException | None,
                     joining: bool) -> tuple[int, bool, int]:
        """Every rank of the new group, the survivors' ``_recover`` and a joining rank's ``resume``
        alike: agree the newest step any survivor completed; the ranks without it (one step
        behind, or ``joining``) take it, whole, from the lowest rank that has it. Returns (that
        step, whether this rank took it, how many ranks joined)."""
        strategy = self.strategy
        mine = [-1, -(2 ** 62), 1] if joining else [self._steps, -self._steps, 0]
        newest, oldest, joined = (int(v) for v in strategy.all_reduce(torch.tensor(mine, dtype=torch.int64),
                                                                       "max").tolist())
        oldest = -oldest
        if not joining and (newest - oldest > 1 or (self._steps < newest and where not in ("backward", "step"))):
            raise InPlaceImpossible(f"they completed {oldest} to {newest} steps and rank {self.rank} cannot be "
                                    f"brought to step {newest} ({where})") from err
        behind = joining or self._steps < newest
        if newest != oldest or joined:  # the ranks one step behind, or joining, take it from one that has it
            holder = int(strategy.all_reduce(torch.tensor([self.rank if not behind else self.world_size]),
                                             "min").item())
            whole = None
            if not behind:
                whole = self.snapshot.whole(model, optimizer, self._scheduler)
                whole.counters = self.progress.counters() if self.progress is not None else None
            held = strategy.broadcast(whole, holder)
            if behind:
                if not joining:
                    held.rng = self.snapshot.rng  # this rank's own random stream (a joining rank: the holder's)
                self.snapshot = held
        return newest, behind, joined

    def _agree_shards(self, model: Any, optimizer: Any, err: BaseException | None, ring: ShardRing | None,
                      old_rank: int, old_world: int, joining: bool) -> tuple[int, bool, int]:
        """Every rank of an fsdp job's new group, the survivors' ``_recover`` and a joining rank's
        ``setup`` alike: say which old ranks' shards it holds at which step (a survivor: its own,
        live, and the previous node's copy, engine/replicas.py; a joining rank: none), put the state
        of the step every survivor completed together from them, and shard it again at the new
        world size (``FSDPStrategy.reshard_in_place``); a joining rank also takes the rest of that
        step's state (buffers, loss scaler, RNG, data position, scheduler, counters) from the lowest
        survivor. Raises :class:`InPlaceImpossible` where some old rank's shards are on no survivor
        (two adjacent nodes lost) or the survivors are at different steps: the job then restarts
        from the last checkpoint. Returns (that step, whether this rank took it, how many joined)."""
        from trainfleet.engine.fsdp import shard_pieces, whole_state

        strategy = self.strategy
        # the pieces the step is put together from: every old rank's shards, or under hybrid sharding one
        # shard group's (the others hold the same); a survivor holds its own, and the previous node's copy
        count = strategy.mesh_shape[-1] if strategy.replicates_shards else old_world
        own = old_rank % count if count else old_rank
        held = {} if joining else ring.holdings(self._steps) if ring is not None else {own: self._steps}
        said = strategy.all_gather_object({"steps": self._steps, "held": held, "world": old_world,
                                           "pieces": count, "joining": joining})
        survivors = [new_rank for new_rank, s in enumerate(said) if not s["joining"]]
        steps = sorted({int(said[r]["steps"]) for r in survivors})
        if len(steps) != 1:
            raise InPlaceImpossible(f"they completed {steps[0]} to {steps[-1]} steps, and under fsdp a rank "
                                    "cannot take a step it did not compute from a peer") from err
        newest, count = steps[0], int(said[survivors[0]]["pieces"])
        holder: dict[int, int] = {}
        for new_rank in survivors:
            for old, step in said[new_rank]["held"].items():
                if step == newest:
                    holder.setdefault(int(old), new_rank)
        missing = [old for old in range(count) if old not in holder]
        if missing and strategy.replicates_shards:
            raise InPlaceImpossible(f"shard(s) {', '.join(map(str, missing))} of step {newest} are on no survivor "
                                    "(every shard group that held them lost a node)") from err
        if missing:
            raise InPlaceImpossible(f"the shards of rank(s) {', '.join(map(str, missing))} of step {newest} are on "
                                    "no survivor (their node and the next one, which held their copy, are both gone)"
                                    ) from err
        live, sharded = ({}, set()) if joining else shard_pieces(model, optimizer)
        by_rank = []
        for old in range(count):
            mine = None
            if holder[old] == self.rank:
                pieces = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in live.items()} \
                    if old == own else ring.copy_pieces()
                mine = (pieces, sorted(sharded))
            by_rank.append(strategy.broadcast(mine, holder[old]))
        model_state, optimizer_state = whole_state([pieces for pieces, _ in by_rank], set(by_rank[0][1]))
        strategy.reshard_in_place(model, optimizer, model_state, optimizer_state)
        joined = len(said) - len(survivors)
        if joined:  # the rest of the step's state, for the joining ranks: from the lowest survivor's memory
            rest = None
            if self.rank == survivors[0]:
                snap = self.snapshot
                rest = StateSnapshot(snap.step, snap.model, None, snap.precision, snap.rng, list(snap.loaders),
                                     scheduler=self._scheduler.state_dict() if self._scheduler is not None else None,
                                     counters=self.progress.counters() if self.progress is not None else None)
            rest = strategy.broadcast(rest, survivors[0])
            if joining:
                self.snapshot = rest
        return newest, joining, joined

    def _guard_forward(self, model: torch.nn.Module) -> None:
        """fsdp in place: a peer lost in a training forward's all-gathers is recovered from there
        (the watcher's cut, or the peer's death, meets most ranks in the next step's forward). The
        call returns zeros shaped as the last forward's output, whose backward and step do nothing
        (``_redo``): the batch comes again from the loader at the new world size. Through torch's
        own per-instance hook for a compiled call (``Module._compiled_call_impl``)."""
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                out = torch.nn.Module._call_impl(model, *args, **kwargs)
            except RuntimeError as err:
                if not (lost_a_peer(err) and model.training and self._last_output is not None):
                    raise
                self._recover(err, "forward")
                return torch.utils._pytree.tree_map_only(_Output, _Output.zeros, self._last_output)
            self._last_output = torch.utils._pytree.tree_map_only(torch.Tensor, _Output.of, out)
            return out

        model._compiled_call_impl = guarded

    def _take_state(self, model: Any, optimizer: Any, newest: int) -> None:
        """Put the agreed step's state in place at the new world size (the loaders re-sharded)."""
        positions = iter(self.snapshot.loaders)  # the training loaders', in order
        for loader in self._loaders:
            loader.reshard(self.world_size, self.rank, next(positions) if loader.sampler.even else None)
        self.snapshot.restore(model, optimizer, self.precision, lambda rng: restore_rng(rng, self.device))
        self.strategy.discard_gradients(optimizer)  # the interrupted backward's local gradients are not the step's
        self._steps = newest

    def _receive_from_peers(self) -> None:
        """``setup`` on a rank whose node joins a running job in place: the survivors are in their
        ``_recover`` (their DDP rebuilt, as this rank's setup just wrapped its model: the wrap
        broadcast rank 0's parameters and buffers); this rank receives the rest of the newest step's
        state from one of them, and puts it in place in ``resume``."""
        if not self._joining:
            return
        self._joining = False
        began = time.monotonic()
        if self._sharded_in_place:  # fsdp: the shards come whole, then sharded again
            model, optimizer = self._trained
            if optimizer is None:
                raise UsageError("a node that joins an fsdp job in place takes the optimizer's state from its peers "
                                 "in engine.setup(model, optimizer): the optimizer is needed.",
                                 "pass it as the script's first attempt does, or launch with --join restart.")
            newest, _, _ = self._agree_shards(model, optimizer, None, None, -1, 0, joining=True)
        else:
            newest, _, _ = self._agree_state(None, None, "join", None, joining=True)
        self._joined = (newest, began)

    def _join_from_peers(self, model: Any, optimizer: Any, scheduler: Any, dataloader: Any) -> dict[str, Any]:
        """``resume`` on a rank that joined in place: the state received in ``setup`` goes in place.
        Returns ``{"step": the global step}`` (from the data position: a checkpoint's other saved
        values are not held in memory)."""
        (newest, began), self._joined = self._joined, None
        trained = self._trained or (None, None)
        model, optimizer = model or trained[0], optimizer or trained[1]
        if model is None or optimizer is None or dataloader is None:
            raise UsageError("a node that joins in place takes its state from its peers in engine.resume(model, "
                             "optimizer, dataloader=...): all three are needed.",
                             "pass them as the script's first attempt does.")
        self._take_state(model, optimizer, newest)
        if scheduler is not None and self.snapshot.scheduler is not None:
            scheduler.load_state_dict(self.snapshot.scheduler)
        step = data_step(dataloader)
        if self.progress is not None:
            if self.snapshot.counters is not None:  # the survivors redo their batch with a step() first
                self.progress.adopt(self.snapshot.counters, steps_ahead=1)
            if step is not None:
                self.progress.set_base(step)
        print(f"trainfleet: rank {self.rank} joined in place in {time.monotonic() - began:.2f}s: the state of step "
              f"{newest} from its peers' memory, at world size {self.world_size}", flush=True)
        return {"step": step} if step is not None else {}

    # ----- stop requests ---------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self._pending_signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._pending_signal = signum

    def should_stop(self) -> bool:
        """True on every rank once any rank received SIGTERM, SIGINT, SIGUSR1 or SIGUSR2.

        A collective (one small all-reduce): call it on every rank at the same step, then
        checkpoint and leave the loop together, so no rank is left waiting in a collective.
        ``launch`` relays those signals to every worker of every node and gives them
        ``--grace-period`` seconds before SIGKILL. :attr:`stop_signal` says which signal.
        """
        agreed = 0  # also after an in-place recovery inside the call
        joinable = self.strategy.name in REPLICATED_IN_PLACE or self._sharded_in_place
        if self.in_place is not None and self._resumes and not self._said_joinable and joinable:  # resume and
            self._said_joinable = True                                   # should_stop: a node can join in place
            self.in_place.say_resumes()
        joining = self._join_seen > self.restart_count  # a node joins in place (said in the bit above a signal's)
        with self._collective("should_stop"):  # on the host: no wait for the GPU's queue
            agreed = self.strategy.max_on_host(int(self._pending_signal or 0) | (JOIN_FLAG if joining else 0))
        if agreed & JOIN_FLAG:
            self._join_next = True
        agreed &= JOIN_FLAG - 1  # (a signal another rank had meets the next call: it stays pending there)
        if agreed:
            self.stop_signal = agreed
        return bool(agreed)

    # ----- collectives ---------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor | float, op: str = "mean") -> torch.Tensor:
        """Reduce over all ranks (``sum``, ``mean``, ``max``, ``min``, ``product``)."""
        with self._collective("all_reduce"):
            return self.strategy.all_reduce(tensor, op)

    def barrier(self) -> None:
        """Wait for every rank."""
        with self._collective("barrier"):
            self.strategy.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """A tensor or picklable object from rank ``src`` to every rank."""
        with self._collective("broadcast"):
            return self.strategy.broadcast(obj, src)

    @contextlib.contextmanager
    def _phase(self, phase: int):
        """This rank is in ``phase`` (progress_record's numbers) inside."""
        board = self.progress
        if board is None:
            yield
            return
        board.enter(phase)
        try:
            yield
        finally:
            board.leave()

    @contextlib.contextmanager
    def _collective(self, name: str, phase: int = COLLECTIVE):
        """Turn a backend timeout into an error naming this rank and the caller's line; in an
        elastic ddp job, a peer lost in the step's collectives is recovered from in place."""
        try:
            with self._phase(phase):
                yield
        except RuntimeError as err:
            if self.in_place is not None and lost_a_peer(err) and name in ("should_stop", BACKWARD_CALL):
                self._recover(err, "backward" if name == BACKWARD_CALL else "between steps")
                return
            if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
                raise
            raise CollectiveTimeoutError(
                f"rank {self.rank}: {name} at {_call_site()} timed out after "
                f"{getattr(self.strategy, 'timeout_s', '?')}s: the other ranks never joined it. HINT: do all "
                "ranks reach this line (rank-dependent code)? The limit is --collective-timeout.") from err

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on global rank 0 only."""
        if self.is_main:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    def close(self, failed: bool = False) -> None:
        """Finish a pending asynchronous save, then tear the strategy down; called at exit too."""
        if self._watcher is not None:
            self._watcher.stopped.set()
        try:
            self._saver.close()
        finally:
            self._sharded.close()
            self.strategy.teardown(failed)
            if self.progress is not None:
                self.progress.close()

    def _close_at_exit(self) -> None:
        # Python keeps an uncaught exception in sys.last_value for this (the worker does the same)
        self.close(failed=getattr(sys, "last_value", None) is not None)
