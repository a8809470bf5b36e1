"""Checkpoints in the formats people have, read without unpickling arbitrary code.

:func:`read` turns any of them into one payload: trainfleet's own (returned as is), or
``{"format": "foreign", "source": KIND, "model": ..., "optimizer": ..., "scheduler": ...,
"extra": {...}}`` for the others:

- ``timm``: timm's train.py (``state_dict``, ``state_dict_ema`` with ``ema=True``, ``optimizer``,
  ``epoch``, ``args`` as an argparse.Namespace, allowed by :data:`files.SAFE_GLOBALS`);
- ``lightning``: PyTorch Lightning ``.ckpt`` (``state_dict`` keyed by the LightningModule's
  attributes, ``optimizer_states``, ``lr_schedulers``, ``hyper_parameters``); the attribute
  prefix is stripped on load (named, or detected against the model);
- ``safetensors``: a ``.safetensors`` file; ``hf-sharded``: a ``*.index.json`` (safetensors or
  ``pytorch_model*.bin`` shards) or the folder holding one; ``pytorch_model.bin`` is a state_dict;
- ``accelerate``: a ``save_state`` folder (model, ``optimizer.bin``, ``scheduler.bin``; its
  ``random_states_*.pkl`` are plain pickles and are never read);
- ``state_dict``: a bare or wrapped state_dict (``module.``/``_orig_mod.`` prefixes stripped).

Sharded (DCP) folders are read by :mod:`.sharded_load`. Files in torch's format load
with ``weights_only=True`` (CRC-checked); anything else needs ``trust=True``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from trainfleet.engine.checkpoint.files import (
    commit_folder,
    load_file,
    remove_path,
    remove_stale_temporaries,
    save_atomic,
)
from trainfleet.engine.checkpoint.keys import clean_state_dict, extract_model_state
from trainfleet.engine.checkpoint.layout import (
    FORMAT,
    INDEX_FILES,
    INDEX_SUFFIX,
    MODEL_FILES,
    SAFETENSORS,
    folder_kind,
    is_safetensors,
    resolve,
)
from trainfleet.engine.checkpoint.temporaries import new_tag, owner, temporary_name
from trainfleet.utils.errors import UsageError


def read(path: str | os.PathLike[str], trust: bool = False, verify: bool = True, ema: bool = False) -> Any:
    """The payload of any checkpoint this module knows (see the module docstring), on the CPU.

    Raises:
        UsageError: a missing or corrupt file, a pickle beyond the allowlist (unless ``trust``),
            a shard the index names but the folder lacks, or ``ema`` without EMA weights.
    """
    path = resolve(path)
    payload = _read(path, trust, verify)
    if not ema:
        return payload
    if not isinstance(payload, dict) or payload.get("ema") is None:
        raise UsageError(f"{str(path)!r} holds no EMA weights (ema=True): of the formats read here, only timm "
                         "checkpoints written with --model-ema carry them.", "load without ema.")
    return {**payload, "model": payload["ema"]}


def _read(path: Path, trust: bool, verify: bool) -> Any:
    kind = folder_kind(path)
    if kind == "hf-sharded":
        index = next(path / name for name in INDEX_FILES if (path / name).is_file())
        return _foreign("hf-sharded", read_index(index, trust, verify), path)
    if kind is not None:
        model_file = next(path / name for name in MODEL_FILES if (path / name).is_file())
        model = read_weights(model_file, trust, verify)
        return read_accelerate(path, model, trust, verify) if kind == "accelerate" else _foreign("hf", model, path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist.", "check the path.")
    if path.name.endswith(INDEX_SUFFIX):
        return _foreign("hf-sharded", read_index(path, trust, verify), path)
    if is_safetensors(path):
        return _foreign("safetensors", read_safetensors(path), path)
    return classify(load_file(path, map_location="cpu", trust=trust, verify=verify), path)


def _foreign(source: str, model: dict[str, Any], path: Path, **parts: Any) -> dict[str, Any]:
    payload = {"format": "foreign", "source": source, "model": model, "optimizer": None, "scheduler": None,
               "ema": None, "extra": {}}
    payload.update(parts)
    return payload


def classify(payload: Any, path: Path) -> Any:
    """A torch-format payload as trainfleet's own, or as a foreign payload naming its source."""
    if isinstance(payload, Mapping) and payload.get("format") == FORMAT:
        return payload
    if isinstance(payload, Mapping) and "pytorch-lightning_version" in payload:
        return _lightning(payload, path)
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping) and "arch" in payload:
        return _timm(payload, path)
    model = extract_model_state(payload, path)
    optimizer = None
    if isinstance(payload, Mapping):
        optimizer = next((payload[k] for k in ("optimizer", "optimizer_state_dict")
                          if _is_optimizer_state(payload.get(k))), None)
    return _foreign("state_dict", model, path, optimizer=optimizer)


def _is_optimizer_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "state" in obj and "param_groups" in obj


def _timm(payload: Mapping[str, Any], path: Path) -> dict[str, Any]:
    args = payload.get("args")
    extra = {"epoch": payload.get("epoch"), "arch": payload.get("arch"), "metric": payload.get("metric"),
             "args": dict(vars(args)) if args is not None and hasattr(args, "__dict__") else args}
    optimizer = payload.get("optimizer") if _is_optimizer_state(payload.get("optimizer")) else None
    ema = payload.get("state_dict_ema")
    return _foreign("timm", clean_state_dict(payload["state_dict"]), path, optimizer=optimizer,
                    ema=clean_state_dict(ema) if isinstance(ema, Mapping) else None,
                    extra={k: v for k, v in extra.items() if v is not None})


def _lightning(payload: Mapping[str, Any], path: Path) -> dict[str, Any]:
    optimizers = payload.get("optimizer_states") or []
    schedulers = payload.get("lr_schedulers") or []
    extra = {"epoch": payload.get("epoch"), "step": payload.get("global_step"),
             "hyper_parameters": dict(payload.get("hyper_parameters") or {}),
             "lightning_version": payload.get("pytorch-lightning_version")}
    # One optimizer and one scheduler map onto the engine's; with several, none is restored.
    return _foreign("lightning", dict(payload["state_dict"]), path,
                    optimizer=optimizers[0] if len(optimizers) == 1 else None,
                    scheduler=schedulers[0] if len(schedulers) == 1 else None,
                    extra={k: v for k, v in extra.items() if v is not None})


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (no pickle in it; its header is checked against the file's size)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"safetensors file {str(path)!r} is truncated or corrupt ({err}).",
                         "download or save it again.") from err


def read_weights(path: Path, trust: bool = False, verify: bool = True) -> dict[str, Any]:
    """A weights file of either kind: safetensors, or a state_dict in torch's format."""
    if is_safetensors(path):
        return read_safetensors(path)
    return extract_model_state(load_file(path, map_location="cpu", trust=trust, verify=verify), path)


def read_index(index: Path, trust: bool = False, verify: bool = True) -> dict[str, Any]:
    """The state_dict of a sharded HF checkpoint: every shard the index names, each key where it says."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{str(index)!r} is not a checkpoint index ({err}).",
                         "expected {\"weight_map\": {name: shard file}}.") from err
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (index.parent / name).is_file() or "/" in name or ".." in name]
    if missing:
        raise UsageError(f"{str(index)!r} names shards the folder lacks: {missing[:3]}.",
                         "download every shard into the folder.")
    state: dict[str, Any] = {}
    for name in shards:
        part = read_weights(index.parent / name, trust, verify)
        wanted = {k for k, shard in weight_map.items() if shard == name}
        if not wanted <= part.keys():
            raise UsageError(f"shard {name!r} lacks {sorted(wanted - part.keys())[:3]} that {index.name} "
                             "places there.", "download the shard again.")
        state.update((k, part[k]) for k in wanted)
    return state


def read_accelerate(folder: Path, model: dict[str, Any], trust: bool, verify: bool) -> dict[str, Any]:
    """An Accelerate ``save_state`` folder: model 0, its optimizer and scheduler (weights-only)."""
    parts: dict[str, Any] = {}
    for key, name in (("optimizer", "optimizer.bin"), ("scheduler", "scheduler.bin")):
        if (folder / name).is_file():
            parts[key] = load_file(folder / name, map_location="cpu", trust=trust, verify=verify)
    skipped = sorted(p.name for p in folder.glob("*.pkl"))  # plain pickles (RNG states): never unpickled
    return _foreign("accelerate", model, folder, extra={"not_read": skipped} if skipped else {}, **parts)


def _writable(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory (safetensors refuses shared storage, e.g. tied weights)."""
    out, seen = {}, set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"{key!r} is a {type(value).__name__}, not a tensor: safetensors stores tensors only.",
                             "save model weights, or use the trainfleet format.")
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()
        elif tensor.numel():
            seen.add(storage)
        out[key] = tensor
    return out


def save_safetensors(state: Mapping[str, Any], path: str | os.PathLike[str], max_shard_size: int | None = None,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write weights as ``path`` (one safetensors file), or above ``max_shard_size`` bytes as a
    folder ``path`` of ``model-0000K-of-0000N.safetensors`` shards with a
    ``model.safetensors.index.json`` (the layout HF libraries load). Atomic either way."""
    from safetensors.torch import save

    tensors = _writable(state)
    meta = {"format": "pt", **(metadata or {})}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    path = Path(path)
    if max_shard_size is None or total <= max_shard_size:
        return save_atomic(tensors, path, writer=lambda obj, handle: handle.write(save(obj, meta)))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    tmp = path.parent / temporary_name(path, owner(), new_tag())
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    try:
        tmp.mkdir()
        weight_map = {}
        for number, shard in enumerate(shards, 1):
            name = f"model-{number:05d}-of-{len(shards):05d}{SAFETENSORS}"
            save_atomic(shard, tmp / name, writer=lambda obj, handle: handle.write(save(obj, meta)))
            weight_map.update((key, name) for key in shard)
        index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1).encode()
        save_atomic(index, tmp / INDEX_FILES[0], writer=lambda data, handle: handle.write(data))
        return commit_folder(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"64KiB"`` or a byte count, as bytes (decimal units as HF uses them)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise UsageError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 1048576.")
    return int(value * units[unit])
