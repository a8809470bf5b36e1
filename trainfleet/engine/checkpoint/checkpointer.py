"""What ``Engine.save``, ``Engine.load`` and ``Engine.resume`` do: one home for the choice among
the writers (one file from rank 0, a sharded folder from every rank, safetensors weights), the
training state that goes with the weights, and loading any of them (or a foreign checkpoint)
onto this device and world size.

:class:`CheckpointMixin` is a base class of :class:`~trainfleet.engine.engine.Engine`; it uses the
engine's ``strategy``, ``barrier``, ``print``, ``elastic``, and the ``_saver``
(:class:`~.files.AsyncSaver`) and ``_sharded`` (:class:`~.sharded.ShardedCheckpointer`) the engine
creates.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from trainfleet.engine.checkpoint import foreign
from trainfleet.engine.checkpoint.files import record_latest, save_atomic, storage_address, to_cpu
from trainfleet.engine.checkpoint.foreign import save_safetensors
from trainfleet.engine.checkpoint.keys import apply_model_state, clean_state_dict, extract_model_state
from trainfleet.engine.checkpoint.layout import FORMAT, FORMAT_VERSION, MANIFEST, is_sharded, resolve
from trainfleet.engine.checkpoint.sharded import flatten, make_sidecar, optimizer_template, rng_key, rng_tensor
from trainfleet.engine.checkpoint.sharded_load import load_folder
from trainfleet.engine.checkpoint.training_state import capture_rng, library_versions
from trainfleet.engine.checkpoint.training_state import restore_rng as restore_rng_state
from trainfleet.engine.contract import JobSettings
from trainfleet.engine.data import DeviceDataLoader
from trainfleet.engine.environment import data_step, note_resume
from trainfleet.engine.progress_record import CHECKPOINT
from trainfleet.engine.recovery import lost_a_peer
from trainfleet.utils.errors import UsageError


def _in_checkpoint_phase(kind: str) -> Any:
    """The rank is in the checkpoint phase while the method runs (its agent allows a save longer
    than a step before it calls anything a hang); its time is ``kind`` ("save" or "load") in the
    rank's account (launcher/ledger.py: the job's checkpoint stalls and loads).

    A save that loses a peer in an elastic ddp job (a collective or the store failing as a node
    dies or is cut off) is recovered from in place, as between steps, and made again by the
    survivors: the same step's checkpoint at the new world size. Before, the survivors' workers
    exited and the job failed (tests/launcher/test_elastic.py, a frozen agent met during a save)."""
    def decorate(method: Any) -> Any:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            board = self.progress
            if board is not None:
                board.begin(kind)
            try:
                try:
                    with self._phase(CHECKPOINT):
                        return method(self, *args, **kwargs)
                except RuntimeError as err:
                    if kind != "save" or self.in_place is None or not lost_a_peer(err):
                        raise
                    self._recover(err, "between steps")  # raises err where that cannot be done
                with self._phase(CHECKPOINT):
                    return method(self, *args, **kwargs)
            finally:
                if board is not None:
                    board.end()
        return wrapper
    return decorate


class CheckpointMixin:
    """Engine.save/load/resume and what they share (see the module's docstring)."""

    def _rng(self) -> dict[str, Any]:
        return capture_rng(self.device, every_gpu=self.strategy.name == "dp")  # dp computes on every GPU

    def _common_state(self, scheduler: Any, dataloader: DeviceDataLoader | None, extra: dict[str, Any],
                      gather_rng: bool = True) -> dict[str, Any]:
        """Everything but the model and optimizer tensors; with ``gather_rng`` a collective that
        brings every rank's RNG state to each (a sharded save has each rank write its own)."""
        rng = self.strategy.all_gather_object(self._rng()) if gather_rng else None
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
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
        state["model"] = clean_state_dict(self.precision.module_state(
            module, self.strategy.full_model_state(module))) if module is not None else None
        state["optimizer"] = self.strategy.full_optimizer_state(module, optimizer) if optimizer is not None else None
        return state

    @_in_checkpoint_phase("save")
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
        if self.progress is not None:  # under launch: an out-of-step job writes nothing
            self.progress.agree_before_save()
        if format == "safetensors":
            return self._save_weights(path, model, keep_last, extra, optimizer=optimizer, scheduler=scheduler,
                                      dataloader=dataloader, asynchronous=asynchronous, sharded=sharded)
        if self.strategy.shards_checkpoints if sharded is None else sharded:
            return self._save_sharded(path, model, optimizer, scheduler, dataloader, keep_last, asynchronous, extra)
        state = self.state_dict(model, optimizer, scheduler, dataloader, **extra)
        if self.is_main:
            self._saver.wait()  # one save at a time; frees the staging buffers
            staged = self._saver.stage(state, self._written_by_steps(optimizer)) if asynchronous else to_cpu(state)

            def write() -> None:
                save_atomic(staged, path)
                if keep_last is not None:
                    record_latest(path, keep_last)

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
        state = clean_state_dict(self.precision.module_state(module, self.strategy.full_model_state(module)))
        if self.is_main:
            save_safetensors(state, path, metadata={str(k): str(v) for k, v in extra.items()})
            if keep_last is not None:
                record_latest(path, keep_last)
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
                optimizer_state = optimizer_template(module, optimizer)
        tensors, layout = flatten(model_state, optimizer_state)
        tensors[rng_key(self.rank)] = rng_tensor(self._rng())
        side = make_sidecar(self._common_state(scheduler, dataloader, extra, gather_rng=False), layout)
        later = self._written_by_steps(optimizer) if asynchronous else None  # (a synchronous save copies nothing)
        return self._sharded.save(path, tensors, side, keep_last, asynchronous, later)

    def _written_by_steps(self, optimizer: Any) -> set[int]:
        """Where the parameters and state of ``optimizer`` live, when only its steps write them and each
        step first waits for an asynchronous save's copies (:meth:`Engine.setup` hooks it): an
        asynchronous save copies them on its writer thread, during the next forward and backward."""
        if optimizer is None or optimizer not in self._step_hooked:
            return set()
        found = {storage_address(p) for group in optimizer.param_groups for p in group["params"]}
        found |= {storage_address(value) for state in optimizer.state.values() for value in state.values()
                  if isinstance(value, torch.Tensor)}
        return found

    @_in_checkpoint_phase("save")
    def wait_for_checkpoint(self) -> None:
        """Block until an asynchronous save is on disk (raises its error if it failed)."""
        self._saver.wait()

    @_in_checkpoint_phase("load")
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
        path = resolve(path)
        module = self.unwrap(model) if model is not None else None
        self._saver.wait_staged()  # an asynchronous save's copies of the tensors this overwrites come first
        if is_sharded(path):
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
        payload = foreign.read(path, trust=trust, verify=verify, ema=ema)
        if module is not None:
            model_state = extract_model_state(payload, path)
            apply_model_state(module, model_state, strict, path, prefix=prefix,
                                   load=lambda state: self.strategy.load_full_model_state(module, state))
            self.precision.load_module_state(module, model_state)
        if not (isinstance(payload, dict) and payload.get("format") in (FORMAT, "foreign")):
            return None
        if optimizer is not None and payload.get("optimizer") is not None:
            with self.precision.optimizer_params(optimizer):  # O2: state stays fp32
                self.strategy.load_full_optimizer_state(module, optimizer, payload["optimizer"], str(path))
        return payload

    def _load_sharded(self, path: Path, module: torch.nn.Module | None, optimizer: Any,
                      strict: bool) -> dict[str, Any] | None:
        """Each rank reads its own shards (fsdp) or whole tensors (other strategies) from a folder."""
        return load_folder(path, module, optimizer, strict, self.precision, self.rank)

    @property
    def checkpoint_dir(self) -> Path:
        """Where to save checkpoints a requeued job resumes from: the job's folder under
        ``launch --cluster``, else ``./checkpoints``."""
        return Path(JobSettings.from_env().checkpoint_dir or "checkpoints")

    def resume(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
               scheduler: Any = None, dataloader: DeviceDataLoader | None = None,
               path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Load the latest checkpoint of ``path`` (default :attr:`checkpoint_dir`), if any.

        The pair of ``engine.save(engine.checkpoint_dir / f"step{step}.pt", ..., keep_last=2)``
        when :meth:`should_stop` says so: a preempted and requeued job continues exactly
        where it stopped. Returns the saved ``extra`` values, or ``{}`` on a fresh start.
        """
        if scheduler is not None:  # a joining rank takes its state from the peers' memory, this too
            self._scheduler = scheduler
        self._resumes = True  # with should_stop() called too, a node can join in place (its agent is told there)
        if self._joined is not None:  # this node joined a running job in place: its peers' state, not a file's
            return self._join_from_peers(model, optimizer, scheduler, dataloader)
        where = Path(path) if path is not None else self.checkpoint_dir
        found = where.is_file() or (where / MANIFEST).is_file() or is_sharded(where)
        extra = {}
        if found:
            path = resolve(where)
            extra = self.load(path, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=dataloader)
            self.print(f"resumed from {path}")
        if self.progress is not None:  # the job's ledger counts the steps computed again from it
            step = data_step(dataloader) if dataloader is not None else None if found else 0
            if step is not None:
                self.progress.set_base(step)
        if self.elastic is not None and self.elastic.record and self.is_main:  # for launch's report
            note_resume(self.elastic.record, path if found else None, dataloader)
        return extra
