"""Reading a sharded (DCP) checkpoint folder, each rank its own part, at any world size, under
any strategy. The index is read through an allowlist unpickler and every shard file it names is
checked before any is read (see :mod:`.sharded` for the layout and the safety notes).
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from trainfleet.engine.checkpoint import chunks
from trainfleet.engine.checkpoint.files import load_file
from trainfleet.engine.checkpoint.keys import compare_keys
from trainfleet.engine.checkpoint.layout import DCP_METADATA, SIDECAR
from trainfleet.engine.checkpoint.sharded import (
    _single_process,
    flatten,
    model_keys,
    optimizer_template,
    rng_state,
    rng_template,
    unflatten_optimizer,
)
from trainfleet.engine.checkpoint.training_state import check_optimizer_names
from trainfleet.utils.errors import UsageError

_INDEX_CLASSES = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "TensorProperties",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


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
    path = folder / DCP_METADATA
    try:
        with open(path, "rb") as handle:
            return _IndexUnpickler(handle).load()
    except pickle.UnpicklingError as err:
        raise UsageError(f"refusing to load {str(folder)!r}: its {DCP_METADATA} pickles {err}, which could "
                         "run code on load.", "only DCP's own index classes are accepted; re-save the "
                         "checkpoint with trainfleet or torch.distributed.checkpoint.") from err
    except (EOFError, OSError, ValueError, TypeError, AttributeError) as err:
        raise UsageError(f"sharded checkpoint {str(folder)!r}: {DCP_METADATA} is truncated or corrupt "
                         f"({type(err).__name__}: {err}).", "load an earlier checkpoint.") from err


def _writer_rank(file_name: str) -> str:
    found = re.match(r"__(\d+)_\d+\.distcp$", file_name)
    return f"rank {found.group(1)}" if found else "an unknown rank"


def _check_chunk(folder: Path, name: object) -> None:
    """A shard file name of ``folder``: a plain name of a file inside it, or refused
    (a crafted index could point a chunk at any local file, or learn other files' sizes)."""
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name:
        raise UsageError(f"refusing to load {str(folder)!r}: its {DCP_METADATA} points a chunk at {name!r}, outside "
                         "the folder.", "only shard files inside the checkpoint folder are read; re-save it.")
    path = folder / name
    if path.is_symlink() and os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):
        raise UsageError(f"refusing to load {str(folder)!r}: shard {name} is a link to a file outside the folder.",
                         "copy the checkpoint with its files, not links.")


def check_shards(folder: Path, index: Any) -> None:
    """Every file the index names is inside the folder, exists and holds the bytes it should; the
    tensors it declares fit in those bytes (allocations are bounded by the files on disk).

    Raises:
        UsageError: a chunk outside the folder, a missing or truncated shard file (naming the rank
            that wrote it), or tensors larger than the folder holds.
    """
    needed: dict[str, int] = {}
    for info in (getattr(index, "storage_data", None) or {}).values():
        if not isinstance(info.relative_path, str) or info.relative_path not in needed:
            _check_chunk(folder, info.relative_path)  # once per file
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            # a negative offset would pass the size check below and size a read buffer at will
            raise UsageError(f"refusing to load {str(folder)!r}: its {DCP_METADATA} gives a chunk of "
                             f"{info.relative_path} at byte {offset!r}, {length!r} bytes long.",
                             "re-save the checkpoint with trainfleet or torch.distributed.checkpoint.")
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    hint = "copy the whole folder again, or load an earlier checkpoint."
    stored = 0
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            raise UsageError(f"sharded checkpoint {str(folder)!r} is incomplete: {name} (written by "
                             f"{_writer_rank(name)}) is missing.", hint)
        actual = path.stat().st_size
        if actual < size:
            raise UsageError(f"sharded checkpoint {str(folder)!r} is damaged: {name} (written by "
                             f"{_writer_rank(name)}) is truncated to {actual} bytes; the index needs {size}.", hint)
        stored += actual
    declared = sum(_tensor_bytes(meta) for meta in index.state_dict_metadata.values())
    if declared > stored:
        raise UsageError(f"refusing to load {str(folder)!r}: its {DCP_METADATA} declares {declared} bytes of tensors "
                         f"but its shard files hold {stored}.", hint)


def _tensor_bytes(meta: Any) -> int:
    size = getattr(meta, "size", None)
    dtype = getattr(getattr(meta, "properties", None), "dtype", None)
    if size is None or not isinstance(dtype, torch.dtype):
        return 0
    count = 1
    for dim in size:
        count *= max(int(dim), 0)
    return count * dtype.itemsize


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
    return load_file(path) if path.is_file() else None


def _reader(folder: Path, index: Any) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader, given the index already read through the allowlist and checked (read
        once: a second read would cost the time again and could find another file). Used where
        :mod:`.chunks` does not read a folder itself (compressed chunks, unusual shard layouts)."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return SafeReader(str(folder))


def _open(folder: Path) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """The checked index, its tensor entries and the sidecar of a sharded folder."""
    index = read_index(folder)
    check_shards(folder, index)
    return index, tensor_entries(index, folder), read_sidecar(folder)


def open_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The checked tensor entries and the sidecar of a sharded folder."""
    return _open(folder)[1:]


def read_all(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Every tensor of a folder, whole, on the CPU of this process, with the sidecar."""
    index, entries, sidecar = _open(folder)
    tensors = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in entries.items()}
    _fill(folder, index, tensors, entries)
    return tensors, sidecar


def read_into(folder: Path, index: Any, template: dict[str, torch.Tensor], entries: dict[str, Any]) -> None:
    """Fill ``template`` (this rank's shards, or whole tensors) from ``folder`` in place.

    Every rank reads alone: a DTensor shard knows its own offsets, whole tensors need none, and
    loading has nothing to agree on, so DCP's planning collectives are skipped.
    """
    missing = sorted(k for k in template if k not in entries)
    if missing:
        raise UsageError(f"sharded checkpoint {str(folder)!r} has no {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}.", "was it saved with this optimizer?")
    _fill(folder, index, template, entries)


def _fill(folder: Path, index: Any, template: dict[str, torch.Tensor], entries: dict[str, Any]) -> None:
    """Read ``template``'s tensors: the chunks overlapping each one, straight from the shard files
    (:mod:`.chunks`: no ``torch.load`` per chunk and no DCP planning per chunk; resharding 4 -> 2
    cost 1.36x a same-world load through DCP), or through DCP's reader for what that does not cover."""
    import torch.distributed.checkpoint as dcp

    for key, tensor in template.items():
        if tuple(entries[key].size) != tuple(tensor.shape):
            raise UsageError(f"sharded checkpoint {str(folder)!r}: {key} is {tuple(entries[key].size)} there, "
                             f"{tuple(tensor.shape)} here.", "load it into the model and optimizer that saved it.")
    storage = getattr(index, "storage_data", None) or {}
    if not any(getattr(info, "transform_descriptors", None) for info in storage.values()):  # not compressed
        reads = chunks.plan(template, entries, storage)
        if reads is not None:
            try:
                chunks.read_chunks(folder, reads)
            except chunks.ChunkError as err:
                raise UsageError(f"sharded checkpoint {str(folder)!r} is damaged: {err.name} (written by "
                                 f"{_writer_rank(err.name)}) holds a chunk that does not decode ({err}).",
                                 "copy the whole folder again, or load an earlier checkpoint.") from err
            return
    with _single_process():
        dcp.load(template, storage_reader=_reader(folder, index), no_dist=True)


def load_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put a name-keyed optimizer state (shards or whole tensors), names already checked, into ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, {"state": state["state"], "param_groups": state["param_groups"]})


def load_folder(path: Path, module: torch.nn.Module | None, optimizer: Any, strict: bool, precision: Any,
                rank: int) -> dict[str, Any] | None:
    """Load a sharded folder: each rank reads its own shards (fsdp) or whole tensors (other
    strategies), whatever the world size that wrote it. Returns the sidecar (this rank's RNG in it)."""
    index, entries, sidecar = _open(path)
    stored = model_keys(entries, sidecar)
    template: dict[str, torch.Tensor] = {}
    report, current = None, None
    if module is not None:
        own = precision.module_state(module, module.state_dict())
        shapes = {name: tuple(entries[key].size) for name, key in stored.items()}
        report = compare_keys(module, shapes, (), strict, path)
        template.update((stored[name], own[name]) for name in report["loaded"])
    layout = (sidecar or {}).get("optimizer")
    if optimizer is not None and layout:
        check_optimizer_names(optimizer, module, layout, str(path))
        with precision.optimizer_params(optimizer):
            current = optimizer_template(module, optimizer)
        template.update(flatten(None, current)[0])
    rng = rng_template(entries, rank)
    template.update(rng)
    read_into(path, index, template, entries)
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
