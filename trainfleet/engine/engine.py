"""The ``Engine``: the one object a training script talks to."""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch.utils.data import Dataset

from trainfleet.engine import checkpoint as ckpt
from trainfleet.engine import formats
from trainfleet.engine import sharded as sharded_ckpt
from trainfleet.engine.data import (DeviceDataLoader, GlobalOrderSampler, build_loader, elastic_global_batch,
                                   resolve_batch_sizes)
from trainfleet.engine.environment import ElasticInfo, note_resume
from trainfleet.engine.precision import build_precision
from trainfleet.engine.profiling import StepTimer
from trainfleet.engine.state import capture_rng, library_versions
from trainfleet.engine.state import restore_rng as restore_rng_state
from trainfleet.engine.strategy import Strategy, build_strategy
from trainfleet.utils.errors import UsageError
from trainfleet.utils.process import EARLY_SIGNALS


STOP_REQUEST_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


class CollectiveTimeoutError(RuntimeError):
    """A collective timed out; the message names the rank and the call site."""


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


class Engine:
    """Runs a training script under one strategy and precision.

    Args:
        strategy: a name (``single``, ``dp``, ``ddp``) or a Strategy; defaults to
            TRAINFLEET_STRATEGY (set by ``launch``), else ``ddp`` under a launcher
            and ``single`` for a plain ``python train.py``.
        precision: a name (``32``, ``bf16``, ``16-mixed``, ``O0``-``O3``) or a Precision;
            defaults to TRAINFLEET_PRECISION.
        seed: seeds Python, NumPy and torch on every rank alike.
        accelerator: ``auto``, ``cpu`` or ``cuda``; defaults to TRAINFLEET_ACCELERATOR.
        amp_backend: ``native`` (torch.amp, the default) or ``apex``; TRAINFLEET_AMP_BACKEND.
        **strategy_kwargs: passed to the strategy (``find_unused_parameters=True``, fsdp's
            ``wrap=``, ...); under ``launch`` they default to ``--strategy-opt`` (TRAINFLEET_STRATEGY_OPTIONS).
    """

    def __init__(self, strategy: str | Strategy | None = None, precision: Any = None,
                 seed: int = 0, accelerator: str | None = None, amp_backend: str | None = None,
                 **strategy_kwargs: Any):
        env = os.environ
        if strategy is None and not strategy_kwargs and env.get("TRAINFLEET_STRATEGY_OPTIONS"):
            strategy_kwargs = json.loads(env["TRAINFLEET_STRATEGY_OPTIONS"])
        if not isinstance(strategy, Strategy):
            precision = build_precision(precision or env.get("TRAINFLEET_PRECISION") or None,
                                        amp_backend or env.get("TRAINFLEET_AMP_BACKEND") or None)
        self.strategy = build_strategy(
            strategy or env.get("TRAINFLEET_STRATEGY") or None,
            precision=precision,
            accelerator=accelerator or env.get("TRAINFLEET_ACCELERATOR") or None,
            **strategy_kwargs,
        )
        self.seed = seed
        self._saver = ckpt.AsyncSaver()
        seed_everything(seed)
        self.strategy.setup_environment()
        self._sharded = sharded_ckpt.ShardedCheckpointer(self.strategy, self._saver)
        self.stop_signal: int | None = None  # the signal behind a stop request, once agreed
        self._pending_signal: int | None = None
        if env.get("TRAINFLEET_RUN_ID") and threading.current_thread() is threading.main_thread():
            for signum in STOP_REQUEST_SIGNALS:  # only under launch: a plain script keeps Python's defaults
                signal.signal(signum, self._on_signal)
            self._pending_signal = EARLY_SIGNALS[-1] if EARLY_SIGNALS else None  # came before this Engine
        self.elastic = ElasticInfo.from_env() if env.get("TRAINFLEET_RUN_ID") else None  # launch --nodes MIN:MAX
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
        model, optimizer = self.precision.connect(model, optimizer)
        model = self.strategy.setup_module(model)
        if optimizer is None:
            return model
        return model, self.strategy.setup_optimizer(optimizer)

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
        return build_loader(dataset, sampler, self.device, num_workers, collate_fn, self.timer, loader_kwargs)

    # ----- the step ------------------------------------------------------------------
    def autocast(self) -> ContextManager[Any]:
        """Context for the forward pass under the configured precision."""
        return self.precision.forward_context()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` through the precision (loss scaling) and strategy."""
        with self._collective("backward (gradient all-reduce)"):
            if self.timer is None:
                self.strategy.backward(loss)
                return
            self.timer.forward_done()
            with self.timer.phase("backward"):
                self.strategy.backward(loss)

    def step(self, optimizer: torch.optim.Optimizer, zero_grad: bool = True) -> bool:
        """Optimizer step, then zero the gradients. Returns False if the step was skipped."""
        with self.timer.phase("optimizer") if self.timer is not None else contextlib.nullcontext():
            stepped = self.strategy.optimizer_step(optimizer)
            if zero_grad:
                self.strategy.zero_grad(optimizer)
        if self.timer is not None:
            self.timer.optimizer = optimizer
            self.timer.step_done()
        return stepped

    def no_sync(self, model: torch.nn.Module) -> ContextManager[Any]:
        """Skip gradient synchronisation inside (accumulate, then step outside)."""
        return self.strategy.no_backward_sync(model)

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
        with self._collective("should_stop"):  # on the host: no wait for the GPU's queue
            agreed = self.strategy.max_on_host(int(self._pending_signal or 0))
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
    def _collective(self, name: str):
        """Turn a backend timeout into an error naming this rank and the caller's line."""
        try:
            yield
        except RuntimeError as err:
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

    # ----- checkpoints ---------------------------------------------------------------
    def _rng(self) -> dict[str, Any]:
        return capture_rng(self.device, every_gpu=self.strategy.name == "dp")  # dp computes on every GPU

    def _common_state(self, scheduler: Any, dataloader: DeviceDataLoader | None, extra: dict[str, Any],
                      gather_rng: bool = True) -> dict[str, Any]:
        """Everything but the model and optimizer tensors; with ``gather_rng`` a collective that
        brings every rank's RNG state to each (a sharded save has each rank write its own)."""
        rng = self.strategy.all_gather_object(self._rng()) if gather_rng else None
        return {
            "format": ckpt.FORMAT,
            "version": ckpt.FORMAT_VERSION,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "precision": self.precision.state_dict(),
            "data": dataloader.state_dict() if dataloader is not None else None,
            "rng": rng,
            "meta": {"world_size": self.world_size, "strategy": self.strategy.name,
                     "precision": self.precision.name, "versions": library_versions(),
                     "checksum": "crc32 of every zip record (verified on load)"},
            "extra": extra,
        }

    def state_dict(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                   scheduler: Any = None, dataloader: DeviceDataLoader | None = None,
                   **extra: Any) -> dict[str, Any]:
        """The single-file checkpoint payload (a collective: RNG from every rank; fsdp gathers).

        The model is unwrapped, whole and on the CPU (under fsdp, on global rank 0 only);
        the optimizer state is keyed by parameter name; ``extra`` values must be weights-only
        loadable (numbers, strings, tensors and containers of them).
        """
        module = self.unwrap(model) if model is not None else None
        state = self._common_state(scheduler, dataloader, extra)
        state["model"] = ckpt.clean_state_dict(self.precision.module_state(
            module, self.strategy.full_model_state(module))) if module is not None else None
        state["optimizer"] = self.strategy.full_optimizer_state(module, optimizer) if optimizer is not None else None
        return state

    def save(self, path: str | os.PathLike[str], model: torch.nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             dataloader: DeviceDataLoader | None = None, *, keep_last: int | None = None,
             asynchronous: bool = False, sharded: bool | None = None, format: str = "trainfleet",
             **extra: Any) -> Path:
        """Write a checkpoint, atomically. Call it on every rank.

        Args:
            keep_last: record the checkpoint in its folder's ``latest.json`` and delete the
                checkpoints recorded there beyond the last ``keep_last``.
            asynchronous: return once the state is copied to CPU memory; a background
                thread writes it (the next save or :meth:`wait_for_checkpoint` waits for it).
            sharded: write a folder in which every rank writes its own shards in parallel
                (torch.distributed.checkpoint) instead of one file from global rank 0. The
                default is the strategy's: sharded under ``fsdp``, a file otherwise. Either
                kind loads into any strategy and world size.
            format: ``"trainfleet"``, or ``"safetensors"`` for the model's weights alone (one
                file from rank 0, readable by any safetensors/HF tool; ``extra`` goes into its
                text metadata).
            **extra: your own values (``step=``, ``epoch=``), returned by :meth:`load`.

        Returns:
            The path written (or being written).
        """
        path = Path(path)
        if format not in ("trainfleet", "safetensors"):
            raise UsageError(f"save(format={format!r}): expected 'trainfleet' or 'safetensors'.")
        if format == "safetensors":
            return self._save_weights(path, model, keep_last, extra, optimizer=optimizer, scheduler=scheduler,
                                      dataloader=dataloader, asynchronous=asynchronous, sharded=sharded)
        if self.strategy.shards_checkpoints if sharded is None else sharded:
            return self._save_sharded(path, model, optimizer, scheduler, dataloader, keep_last, asynchronous, extra)
        state = self.state_dict(model, optimizer, scheduler, dataloader, **extra)
        if self.is_main:
            self._saver.wait()  # one save at a time; frees the staging buffers
            staged = self._saver.stage(state) if asynchronous else ckpt.to_cpu(state)

            def write() -> None:
                ckpt.save_atomic(staged, path)
                if keep_last is not None:
                    ckpt.record_latest(path, keep_last)

            if asynchronous:
                self._saver.submit(write)
            else:
                write()
        if not asynchronous:
            self.barrier()
        return path

    def _save_weights(self, path: Path, model: torch.nn.Module | None, keep_last: int | None,
                      extra: dict[str, Any], **training_state: Any) -> Path:
        """The model's weights as one safetensors file (gathered whole under fsdp)."""
        given = [name for name, value in training_state.items() if value]
        if model is None or given:
            what = f"it was given {', '.join(given)}" if given else "no model was given"
            raise UsageError(f"save(format='safetensors') writes model weights only, but {what}.",
                             "pass model= alone, and save training state in the trainfleet format.")
        module = self.unwrap(model)
        state = ckpt.clean_state_dict(self.precision.module_state(module, self.strategy.full_model_state(module)))
        if self.is_main:
            formats.save_safetensors(state, path, metadata={str(k): str(v) for k, v in extra.items()})
            if keep_last is not None:
                ckpt.record_latest(path, keep_last)
        self.barrier()
        return path

    def _save_sharded(self, path: Path, model: torch.nn.Module | None, optimizer: Any, scheduler: Any,
                      dataloader: DeviceDataLoader | None, keep_last: int | None, asynchronous: bool,
                      extra: dict[str, Any]) -> Path:
        module = self.unwrap(model) if model is not None else None
        if optimizer is not None and module is None:
            raise UsageError("a sharded checkpoint names optimizer state by parameter: pass model= too.")
        model_state = self.precision.module_state(module, module.state_dict()) if module is not None else None
        optimizer_state = None
        if optimizer is not None:
            with self.precision.optimizer_params(optimizer):  # O2: the fp32 masters' state
                optimizer_state = sharded_ckpt.optimizer_template(module, optimizer)
        tensors, layout = sharded_ckpt.flatten(model_state, optimizer_state)
        tensors[sharded_ckpt.rng_key(self.rank)] = sharded_ckpt.rng_tensor(self._rng())
        side = sharded_ckpt.make_sidecar(self._common_state(scheduler, dataloader, extra, gather_rng=False), layout)
        return self._sharded.save(path, tensors, side, keep_last, asynchronous)

    def wait_for_checkpoint(self) -> None:
        """Block until an asynchronous save is on disk (raises its error if it failed)."""
        self._saver.wait()

    def load(self, path: str | os.PathLike[str], model: torch.nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             dataloader: DeviceDataLoader | None = None, strict: bool = True,
             trust: bool = False, restore_rng: bool = True, verify: bool = True, ema: bool = False,
             prefix: str | None = None) -> dict[str, Any]:
        """Restore a checkpoint (or a foreign one: timm, Lightning, safetensors, HF, Accelerate)
        onto this device and world size.

        ``path`` may be a file, a sharded folder (written by any number of ranks: each rank
        reads its own part, so it reshards), or a folder written with ``keep_last`` (its latest).
        Tensors land on the current device whatever device they were saved from;
        ``module.``/``_orig_mod.`` prefixes are handled; the data loader continues
        with the next unseen global sample, at any world size.

        Args:
            strict: every key must match (else only matching keys load, see the report).
            trust: allow files that need full unpickling (only files you trust).
            restore_rng: put back this rank's RNG state.
            verify: check the file's CRC32 records (on a second thread, while it loads).
            ema: timm's EMA weights. prefix: the attribute the weights sit under in the
                checkpoint (Lightning's ``model.``); detected when not given.

        Returns:
            The ``extra`` values given to :meth:`save`; for foreign checkpoints what they
            record (``epoch``, ``step``, ``args``, ``hyper_parameters``).
        """
        path = ckpt.resolve(path)
        module = self.unwrap(model) if model is not None else None
        if ckpt.is_sharded(path):
            payload = self._load_sharded(path, module, optimizer, strict)
        else:
            payload = self._load_file(path, module, optimizer, strict, trust, verify, ema, prefix)
        if payload is None:
            return {}
        if scheduler is not None and payload.get("scheduler") is not None:
            scheduler.load_state_dict(payload["scheduler"])
        if payload.get("precision"):
            self.precision.load_state_dict(payload["precision"])
        if dataloader is not None and payload.get("data"):
            dataloader.load_state_dict(payload["data"])
        if restore_rng and payload.get("rng"):
            rng_states = payload["rng"]
            restore_rng_state(rng_states[self.rank % len(rng_states)], self.device)
        return dict(payload.get("extra") or {})

    def _load_file(self, path: Path, module: torch.nn.Module | None, optimizer: Any, strict: bool,
                   trust: bool, verify: bool, ema: bool, prefix: str | None) -> dict[str, Any] | None:
        payload = formats.read(path, trust=trust, verify=verify, ema=ema)
        if module is not None:
            model_state = ckpt.extract_model_state(payload, path)
            ckpt.apply_model_state(module, model_state, strict, path, prefix=prefix,
                                   load=lambda state: self.strategy.load_full_model_state(module, state))
            self.precision.load_module_state(module, model_state)
        if not (isinstance(payload, dict) and payload.get("format") in (ckpt.FORMAT, "foreign")):
            return None
        if optimizer is not None and payload.get("optimizer") is not None:
            with self.precision.optimizer_params(optimizer):  # O2: state stays fp32
                self.strategy.load_full_optimizer_state(module, optimizer, payload["optimizer"], str(path))
        return payload

    def _load_sharded(self, path: Path, module: torch.nn.Module | None, optimizer: Any,
                      strict: bool) -> dict[str, Any] | None:
        """Each rank reads its own shards (fsdp) or whole tensors (other strategies) from a folder."""
        return sharded_ckpt.load_folder(path, module, optimizer, strict, self.precision, self.rank)

    @property
    def checkpoint_dir(self) -> Path:
        """Where to save checkpoints a requeued job resumes from: the job's folder under
        ``launch --cluster`` (TRAINFLEET_CHECKPOINT_DIR), else ``./checkpoints``."""
        return Path(os.environ.get("TRAINFLEET_CHECKPOINT_DIR") or "checkpoints")

    def resume(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
               scheduler: Any = None, dataloader: DeviceDataLoader | None = None,
               path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Load the latest checkpoint of ``path`` (default :attr:`checkpoint_dir`), if any.

        The pair of ``engine.save(engine.checkpoint_dir / f"step{step}.pt", ..., keep_last=2)``
        when :meth:`should_stop` says so: a preempted and requeued job continues exactly
        where it stopped. Returns the saved ``extra`` values, or ``{}`` on a fresh start.
        """
        where = Path(path) if path is not None else self.checkpoint_dir
        found = where.is_file() or (where / ckpt.MANIFEST).is_file() or ckpt.is_sharded(where)
        extra = {}
        if found:
            path = ckpt.resolve(where)
            extra = self.load(path, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=dataloader)
            self.print(f"resumed from {path}")
        if self.elastic is not None and self.elastic.record and self.is_main:  # for launch's report
            note_resume(self.elastic.record, path if found else None, dataloader)
        return extra

    def close(self, failed: bool = False) -> None:
        """Finish a pending asynchronous save, then tear the strategy down; called at exit too."""
        try:
            self._saver.close()
        finally:
            self._sharded.close()
            self.strategy.teardown(failed)

    def _close_at_exit(self) -> None:
        # Python keeps an uncaught exception in sys.last_value for this (the worker does the same)
        self.close(failed=getattr(sys, "last_value", None) is not None)
