"""Sharded checkpoints (writing; reading is :mod:`.sharded_load`): one folder that every rank
writes in parallel through torch.distributed.checkpoint.

Layout of a folder such as ``checkpoints/step100``::

    .metadata            DCP's index: every tensor's global shape and which file holds each chunk
    __<rank>_<n>.distcp  the chunks each rank wrote
    trainfleet.pt        the rest: data position, every rank's RNG, scheduler, precision state,
                         optimizer hyper-parameters, meta, extra (weights-only, from rank 0)

Tensors are stored as ``model/<name>`` and ``optim/<parameter name>/<state>``: by name, never by
position or rank (each rank's RNG state is ``rng/<rank>``, written by that rank), so a folder written by N ranks under one strategy loads into M ranks under any
other (DCP reads each rank's piece of every tensor from whichever files hold it).

A folder is written under a temporary name and renamed into place once the last rank's data,
DCP's index and the sidecar are on disk, so it is complete or invisible, and ``latest.json``
(``keep_last``) only ever names complete folders.

Safety: DCP reads ``.metadata`` with ``pickle.load`` and non-tensor entries with
``torch.load(weights_only=False)``. trainfleet writes only tensors into DCP, reads ``.metadata``
through an unpickler that admits DCP's own index classes and nothing else, refuses non-tensor
entries, and checks that every shard file the index names exists and is long enough before
reading any of them.
"""
from __future__ import annotations

import contextlib
import io
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from trainfleet.engine.checkpoint.files import (
    AsyncSaver,
    commit_folder,
    record_latest,
    remove_path,
    remove_stale_temporaries,
    save_atomic,
)
from trainfleet.engine.checkpoint.layout import SIDECAR
from trainfleet.engine.checkpoint.temporaries import new_tag, owner, temporary_name
from trainfleet.utils.errors import UsageError

MODEL, OPTIM, RNG = "model/", "optim/", "rng/"


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save/load in a single process": it is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ----- the layout: state dicts <-> flat tensor keys + sidecar --------------------------------
def flatten(model_state: dict[str, Any] | None, optimizer_state: dict[str, Any] | None
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split states into DCP's tensors and the sidecar's rest.

    Args:
        model_state: ``{name: tensor}`` (DTensor shards under fsdp).
        optimizer_state: ``{"state": {param name: {key: value}}, "param_groups": [...]}``.

    Returns:
        ``(tensors, layout)``: layout holds the optimizer's non-tensor parts.
    """
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {"optimizer": None}
    if model_state is not None:
        tensors.update((MODEL + k, v) for k, v in model_state.items() if isinstance(v, torch.Tensor))
    if optimizer_state:
        values: dict[str, dict[str, Any]] = {}
        for name, entries in optimizer_state["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{OPTIM}{name}/{key}"] = value
                else:
                    values.setdefault(name, {})[key] = value
        layout["optimizer"] = {"param_groups": optimizer_state["param_groups"], "state_values": values,
                               "state_keys": {n: sorted(e) for n, e in optimizer_state["state"].items()},
                               "keyed_by": "name"}
    return tensors, layout


def unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict[str, Any],
                        state_keys: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The optimizer state (keyed by parameter name) that :func:`flatten` split up.

    Args:
        state_keys: ``{param name: [state keys]}`` to rebuild, by default the saved ones
            (the loading optimizer's own when it shapes the result).
    """
    state = {}
    for name, keys in (state_keys or layout["state_keys"]).items():
        values = layout["state_values"].get(name, {})
        state[name] = {k: values[k] if k in values else tensors[f"{OPTIM}{name}/{k}"] for k in keys}
    return {"state": state, "param_groups": layout["param_groups"], "keyed_by": "name"}


def model_keys(keys: Any, sidecar: dict[str, Any] | None) -> dict[str, str]:
    """``{model parameter name: stored key}``. trainfleet stores ``model/<name>``, ``dcp.save({"model": sd})``
    stores ``model.<name>``, and a bare ``dcp.save(sd)`` stores ``<name>``."""
    keys = list(keys)
    if sidecar is not None or any(k.startswith(MODEL) for k in keys):
        prefix = MODEL
    else:
        prefix = "model." if any(k.startswith("model.") for k in keys) else ""
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix) and not k.startswith((OPTIM, RNG))}


def make_sidecar(common: dict[str, Any], layout: dict[str, Any]) -> dict[str, Any]:
    """``trainfleet.pt``: the single-file payload minus the tensors DCP holds (RNG included)."""
    meta = {**common.get("meta", {}), "checksum": "every shard file checked against the index (present, "
                                                  "long enough) on load"}
    return {**common, **layout, "meta": meta, "rng": None, "layout": "sharded"}


def publish(tmp: Path, path: Path, keep_last: int | None) -> Path:
    """Once every rank's data, the index and the sidecar are in ``tmp``: rename it into place, record it."""
    commit_folder(tmp, path)
    if keep_last is not None:
        record_latest(path, keep_last)
    return path


def write_folder(tensors: dict[str, torch.Tensor], side: dict[str, Any], path: Path,
                 keep_last: int | None = None) -> Path:
    """Write a sharded folder from this process alone (``ckpt convert``, single-process runs)."""
    import torch.distributed.checkpoint as dcp

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = path.parent / temporary_name(path, owner(), new_tag())
    try:
        with _single_process():
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True), no_dist=True)
        save_atomic(side, tmp / SIDECAR)
        return publish(tmp, path, keep_last)
    except BaseException:
        remove_path(tmp)
        raise


class _Background(threading.Thread):
    """``fn(*args)`` on a thread; :meth:`result` joins it and re-raises its error."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        super().__init__(name="trainfleet-sidecar", daemon=True)
        self._call, self._error = (fn, args), None
        self.start()

    def run(self) -> None:
        fn, args = self._call
        try:
            fn(*args)
        except BaseException as err:  # re-raised by result()
            self._error = err

    def result(self, raise_error: bool = True) -> None:
        self.join()
        if self._error is not None and raise_error:
            raise self._error


def rng_tensor(state: dict[str, Any]) -> torch.Tensor:
    """This rank's RNG state as bytes in a uint8 tensor (``torch.save`` format, read back weights-only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def rng_state(tensor: torch.Tensor) -> dict[str, Any]:
    """What :func:`rng_tensor` encoded; weights-only, so a crafted tensor cannot run code."""
    return torch.load(io.BytesIO(tensor.numpy().tobytes()), weights_only=True)


def rng_key(rank: int) -> str:
    return f"{RNG}{rank}"


def saved_rng_keys(keys: Any) -> list[str]:
    """The stored RNG entries, in rank order."""
    return [rng_key(r) for r in sorted(int(k[len(RNG):]) for k in keys if k.startswith(RNG))]


def rng_template(entries: dict[str, Any], rank: int) -> dict[str, torch.Tensor]:
    """The RNG entry this rank resumes from (``rank % saved ranks``), as an empty tensor to load into."""
    saved = saved_rng_keys(entries)
    if not saved:
        return {}
    key = saved[rank % len(saved)]
    return {key: torch.empty(tuple(entries[key].size), dtype=torch.uint8)}


def optimizer_template(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by name, created if the optimizer has not stepped yet."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer)


class ShardedCheckpointer:
    """Saves sharded folders for one engine, through its strategy and saver thread.

    Args:
        strategy: gives ranks, broadcast and barrier.
        saver: the engine's :class:`~trainfleet.engine.checkpoint.AsyncSaver`: an asynchronous
            save is waited out there, so saves never overlap.
    """

    def __init__(self, strategy: Any, saver: AsyncSaver):
        self.strategy, self.saver = strategy, saver
        self._group: Any = None
        self._writer: tuple[str, str] | None = None
        self._saves = 0

    def _process_group(self) -> Any:
        """A gloo group of its own: an asynchronous save's collectives run on a background
        thread and must not interleave with training's collectives on the default group."""
        if not (dist.is_available() and dist.is_initialized()):
            if self.strategy.world_size > 1:
                raise UsageError(f"sharded checkpoints need torch.distributed, which strategy "
                                 f"{self.strategy.name!r} does not use.", "save a single file: sharded=False.")
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def close(self) -> None:
        """Drop the checkpoint group (destroy_process_group then closes its sockets), and the
        temporary folders' name (an in-place recovery calls this: a rank that joined learns the
        name with the others at the next save, and every rank counts saves from there alike)."""
        self._group = self._writer = None
        self._saves = 0

    def _temporary(self, path: Path) -> Path:
        """The folder every rank writes into: named after rank 0 (its host, boot, pid and start time,
        learnt once with a random token) and a save count every rank keeps alike, so no collective
        is needed per save, and no other job's save can share it. Named only: :meth:`_write` makes it."""
        if self._writer is None:
            self._writer = self.strategy.broadcast((owner(), new_tag()))
        self._saves += 1
        writer, token = self._writer
        return path.parent / temporary_name(path, writer, f"{token}{self._saves}")

    def save(self, path: Path, tensors: dict[str, torch.Tensor], side_state: dict[str, Any],
             keep_last: int | None = None, asynchronous: bool = False, later: set[int] | None = None) -> Path:
        """Every rank writes its shards of ``tensors`` into ``path``; rank 0 adds ``side_state``
        (``trainfleet.pt``) and finishes the folder.

        With ``asynchronous`` this returns once the shards are copied into the saver's buffers in
        CPU memory (``later``: those only the optimizer's next step writes are copied by the saver's
        thread: :class:`AsyncSaver`). DCP's planning (two collectives on the checkpoint's own group), the folder's
        creation, the writing, the rename and ``latest.json`` happen on the saver thread.
        (``dcp.async_save`` planned on the caller's thread and staged into fresh memory each time:
        it blocked for 0.92 of a synchronous save, run.txt at 6614828.)
        """
        self.saver.wait()
        group = self._process_group()
        tmp = self._temporary(path)
        if asynchronous:
            staged = self.saver.stage(tensors, later)
            self.saver.submit(lambda: self._write(path, tmp, staged, side_state, keep_last, group))
            return path
        self._write(path, tmp, tensors, side_state, keep_last, group)
        self.strategy.barrier()
        return path

    def _write(self, path: Path, tmp: Path, tensors: dict[str, torch.Tensor], side_state: dict[str, Any],
               keep_last: int | None, group: Any) -> None:
        """Make ``tmp``, write the shards there (rank 0 the sidecar beside them, on a thread of its
        own), and rank 0 commits the folder as ``path`` after both; on an error it removes ``tmp``."""
        import torch.distributed.checkpoint as dcp

        main = self.strategy.is_global_zero
        if main:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent)
        tmp.mkdir(parents=True, exist_ok=True)
        side = _Background(save_atomic, side_state, tmp / SIDECAR) if main else None
        try:
            writer = dcp.FileSystemWriter(str(tmp), sync_files=True)
            # the warning filter is process-wide: only a world of one (no group) needs it silenced
            with _single_process() if group is None else contextlib.nullcontext():
                dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=group is None)
            if side is not None:
                side.result()
                publish(tmp, path, keep_last)
        except BaseException:
            if side is not None:
                side.result(raise_error=False)
                remove_path(tmp)
            raise
