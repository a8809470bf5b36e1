"""Sharded checkpoints: one folder that every rank writes in parallel through torch.distributed.checkpoint.

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
import os
import pickle
import re
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from trainfleet.engine import checkpoint as ckpt
from trainfleet.utils.errors import UsageError

SIDECAR = "trainfleet.pt"
MODEL, OPTIM, RNG = "model/", "optim/", "rng/"
_INDEX_CLASSES = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "TensorProperties",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save/load in a single process": it is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ----- reading a folder safely -----------------------------------------------------------------
class _IndexUnpickler(pickle.Unpickler):
    """Admits DCP's index dataclasses, torch.Size and dtypes; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INDEX_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_index(folder: Path) -> Any:
    """DCP's ``.metadata`` of ``folder``, unpickled with the allowlist above.

    Raises:
        UsageError: the index names any other global (it could run code), or is truncated.
    """
    path = folder / ckpt.DCP_METADATA
    try:
        with open(path, "rb") as handle:
            return _IndexUnpickler(handle).load()
    except pickle.UnpicklingError as err:
        raise UsageError(f"refusing to load {str(folder)!r}: its {ckpt.DCP_METADATA} pickles {err}, which could "
                         "run code on load.", "only DCP's own index classes are accepted; re-save the "
                         "checkpoint with trainfleet or torch.distributed.checkpoint.") from err
    except (EOFError, OSError, ValueError, TypeError, AttributeError) as err:
        raise UsageError(f"sharded checkpoint {str(folder)!r}: {ckpt.DCP_METADATA} is truncated or corrupt "
                         f"({type(err).__name__}: {err}).", "load an earlier checkpoint.") from err


def _writer_rank(file_name: str) -> str:
    found = re.match(r"__(\d+)_\d+\.distcp$", file_name)
    return f"rank {found.group(1)}" if found else "an unknown rank"


def check_shards(folder: Path, index: Any) -> None:
    """Every file the index names exists and holds the bytes it should.

    Raises:
        UsageError: a missing or truncated shard file, naming the rank that wrote it.
    """
    needed: dict[str, int] = {}
    for info in (getattr(index, "storage_data", None) or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    hint = "copy the whole folder again, or load an earlier checkpoint."
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            raise UsageError(f"sharded checkpoint {str(folder)!r} is incomplete: {name} (written by "
                             f"{_writer_rank(name)}) is missing.", hint)
        actual = path.stat().st_size
        if actual < size:
            raise UsageError(f"sharded checkpoint {str(folder)!r} is damaged: {name} (written by "
                             f"{_writer_rank(name)}) is truncated to {actual} bytes; the index needs {size}.", hint)


def tensor_entries(index: Any, folder: Path) -> dict[str, Any]:
    """``{key: TensorStorageMetadata}``; a non-tensor entry is refused (DCP would unpickle it)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = {}
    for key, meta in index.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            raise UsageError(f"refusing to load {str(folder)!r}: entry {key!r} is a pickled object, not a tensor "
                             "(it could run code on load).", "only tensor entries are read from sharded folders.")
        entries[key] = meta
    return entries


def read_sidecar(folder: Path) -> dict[str, Any] | None:
    """trainfleet's ``trainfleet.pt`` (weights-only, CRC-checked), or None for a foreign DCP folder."""
    path = folder / SIDECAR
    return ckpt.load_file(path) if path.is_file() else None


def _reader(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader, with the index read through the allowlist."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            index = read_index(folder)
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return SafeReader(str(folder))


def open_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The checked tensor entries and the sidecar of a sharded folder (nothing read twice later)."""
    index = read_index(folder)
    check_shards(folder, index)
    return tensor_entries(index, folder), read_sidecar(folder)


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


# ----- writing -----------------------------------------------------------------------------------
def temporary_name(path: Path, pid: int, tag: object) -> str:
    """The hidden name a folder is written under; ``remove_stale_temporaries`` reads the writer's pid from it."""
    return f".{path.name}.tmp-{pid}-{tag}"


def publish(tmp: Path, path: Path, keep_last: int | None) -> Path:
    """Once every rank's data, the index and the sidecar are in ``tmp``: rename it into place, record it."""
    ckpt.commit_folder(tmp, path)
    if keep_last is not None:
        ckpt.record_latest(path, keep_last)
    return path


def write_folder(tensors: dict[str, torch.Tensor], side: dict[str, Any], path: Path,
                 keep_last: int | None = None) -> Path:
    """Write a sharded folder from this process alone (``ckpt convert``, single-process runs)."""
    import torch.distributed.checkpoint as dcp

    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.remove_stale_temporaries(path.parent)
    tmp = path.parent / temporary_name(path, os.getpid(), uuid.uuid4().hex[:8])
    try:
        with _single_process():
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True), no_dist=True)
        ckpt.save_atomic(side, tmp / SIDECAR)
        return publish(tmp, path, keep_last)
    except BaseException:
        ckpt.remove_path(tmp)
        raise


def read_all(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Every tensor of a folder, whole, on the CPU of this process, with the sidecar."""
    import torch.distributed.checkpoint as dcp

    entries, sidecar = open_folder(folder)
    tensors = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in entries.items()}
    with _single_process():
        dcp.load(tensors, storage_reader=_reader(folder), no_dist=True)
    return tensors, sidecar


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


# ----- every rank's RNG state, written by that rank (no gather to rank 0) -------------------------


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


class ShardedCheckpointer:
    """Saves sharded folders for one engine, through its strategy and saver thread.

    Args:
        strategy: gives ranks, broadcast and barrier.
        saver: the engine's :class:`~trainfleet.engine.checkpoint.AsyncSaver`: an asynchronous
            save is waited out there, so saves never overlap.
    """

    def __init__(self, strategy: Any, saver: ckpt.AsyncSaver):
        self.strategy, self.saver = strategy, saver
        self._group: Any = None
        self._writer_pid: int | None = None
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
        """Drop the checkpoint group (destroy_process_group then closes its sockets)."""
        self._group = None

    def _temporary(self, path: Path) -> Path:
        """The folder every rank writes into: named after rank 0's pid (learnt once) and a save
        count that every rank keeps alike, so no collective is needed per save."""
        if self._writer_pid is None:
            self._writer_pid = self.strategy.broadcast(os.getpid())
        self._saves += 1
        if self.strategy.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(path.parent)
        tmp = path.parent / temporary_name(path, self._writer_pid, self._saves)
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def save(self, path: Path, tensors: dict[str, torch.Tensor], side_state: dict[str, Any],
             keep_last: int | None = None, asynchronous: bool = False) -> Path:
        """Every rank writes its shards of ``tensors`` into ``path``; rank 0 adds ``side_state``
        (``trainfleet.pt``) and finishes the folder.

        With ``asynchronous`` this returns once DCP has staged the shards in CPU memory; the
        writing, the rename and ``latest.json`` happen on the saver thread.
        """
        import torch.distributed.checkpoint as dcp

        self.saver.wait()
        group = self._process_group()
        tmp = self._temporary(path)
        main = self.strategy.is_global_zero
        writer = dcp.FileSystemWriter(str(tmp), sync_files=True)

        # Rank 0 writes the sidecar while DCP writes the shards; the folder is committed after both.
        side = _Background(ckpt.save_atomic, side_state, tmp / SIDECAR) if main else None

        def finish(wait: Callable[[], Any] = lambda: None) -> None:
            try:
                wait()
                if side is not None:
                    side.result()
                    publish(tmp, path, keep_last)
            except BaseException:
                if side is not None:
                    side.result(raise_error=False)
                    ckpt.remove_path(tmp)
                raise

        with _single_process():
            if asynchronous:
                future = dcp.async_save(tensors, storage_writer=writer, process_group=group, no_dist=group is None)
                self.saver.submit(lambda: finish(future.result))
                return path
            finish(lambda: dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=group is None))
        self.strategy.barrier()
        return path


def read_into(folder: Path, template: dict[str, torch.Tensor], entries: dict[str, Any]) -> None:
    """Fill ``template`` (this rank's shards, or whole tensors) from ``folder`` in place.

    Every rank reads alone: a DTensor shard knows its own offsets, whole tensors need none, and
    loading has nothing to agree on, so DCP's planning collectives are skipped.
    """
    import torch.distributed.checkpoint as dcp

    missing = sorted(k for k in template if k not in entries)
    if missing:
        raise UsageError(f"sharded checkpoint {str(folder)!r} has no {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}.", "was it saved with this optimizer?")
    with _single_process():
        dcp.load(template, storage_reader=_reader(folder), no_dist=True)


def optimizer_template(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by name, created if the optimizer has not stepped yet."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer)


def load_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put a name-keyed optimizer state (shards or whole tensors), names already checked, into ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, {"state": state["state"], "param_groups": state["param_groups"]})



def load_folder(path: Path, module: torch.nn.Module | None, optimizer: Any, strict: bool, precision: Any,
                rank: int) -> dict[str, Any] | None:
    """Load a sharded folder: each rank reads its own shards (fsdp) or whole tensors (other
    strategies), whatever the world size that wrote it. Returns the sidecar (this rank's RNG in it)."""
    from trainfleet.engine.state import check_optimizer_names

    entries, sidecar = open_folder(path)
    stored = model_keys(entries, sidecar)
    template: dict[str, torch.Tensor] = {}
    report, current = None, None
    if module is not None:
        own = precision.module_state(module, module.state_dict())
        shapes = {name: tuple(entries[key].size) for name, key in stored.items()}
        report = ckpt.compare_keys(module, shapes, (), strict, path)
        template.update((stored[name], own[name]) for name in report["loaded"])
    layout = (sidecar or {}).get("optimizer")
    if optimizer is not None and layout:
        check_optimizer_names(optimizer, module, layout, str(path))
        with precision.optimizer_params(optimizer):
            current = optimizer_template(module, optimizer)
        template.update(flatten(None, current)[0])
    rng = rng_template(entries, rank)
    template.update(rng)
    read_into(path, template, entries)
    if rng and sidecar is not None:
        sidecar = {**sidecar, "rng": [rng_state(t) for t in rng.values()]}
    if report is not None:
        loaded = {name: template[stored[name]] for name in report["loaded"]}
        module.load_state_dict(loaded, strict=False)
        precision.load_module_state(module, loaded)
    if current is not None:
        keys = {name: list(values) for name, values in current["state"].items()}
        with precision.optimizer_params(optimizer):
            load_optimizer(module, optimizer, unflatten_optimizer(template, layout, keys))
    return sidecar
