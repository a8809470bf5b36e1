"""Checkpoint tools behind ``trainfleet ckpt`` and ``trainfleet.load_state_dict``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from trainfleet.engine.checkpoint import foreign, sharded_load
from trainfleet.engine.checkpoint.files import save_atomic, to_cpu
from trainfleet.engine.checkpoint.keys import extract_model_state, strip_prefix
from trainfleet.engine.checkpoint.layout import FORMAT, FORMAT_VERSION, is_sharded, resolve
from trainfleet.engine.checkpoint.sharded import (
    flatten,
    make_sidecar,
    model_keys,
    rng_key,
    rng_state,
    rng_tensor,
    saved_rng_keys,
    unflatten_optimizer,
    write_folder,
)
from trainfleet.engine.checkpoint.training_state import library_versions
from trainfleet.utils.errors import UsageError


def load_state_dict(path: str | os.PathLike[str], map_location: Any = "cpu", trust: bool = False,
                    ema: bool = False, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """A plain model state_dict from any checkpoint, on the CPU unless ``map_location`` says otherwise.

    Accepts trainfleet checkpoints (files and sharded folders), timm and Lightning training
    checkpoints, safetensors files, sharded HF folders (``*.index.json``), ``pytorch_model.bin``,
    Accelerate ``save_state`` folders, plain state_dicts, dicts holding
    ``state_dict``/``model``/``model_state_dict``, and DP/DDP/compiled ones (prefixes
    stripped). Tensors saved on any ``cuda:N`` or the CPU land on ``map_location``, the CPU by
    default: ``model.load_state_dict`` copies them to wherever the model is, and nothing lands on
    (or initialises) the current GPU, which is cuda:0 in every process that has not set its own.

    Args:
        ema: timm's EMA weights (``state_dict_ema``) instead of the trained ones.
        prefix: keep only keys under this attribute, without it (``"model."`` for a
            LightningModule holding the network as ``self.model``).

    Raises:
        UsageError: missing, corrupt or non-weights-only file (unless ``trust``), or no
            model state inside.
    """
    payload = read_checkpoint(path, trust=trust, ema=ema)
    state = extract_model_state(payload, path)
    if prefix:
        state = strip_prefix(state, set(), prefix)
    return {k: v.to(map_location) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def read_checkpoint(path: str | os.PathLike[str], trust: bool = False, ema: bool = False) -> Any:
    """A checkpoint's payload (see :func:`foreign.read`), or a sharded folder gathered whole into
    the single-file layout (on the CPU)."""
    path = resolve(path)
    if not is_sharded(path):
        return foreign.read(path, trust=trust, ema=ema)
    tensors, side = sharded_load.read_all(path)
    model = {name: tensors[key] for name, key in model_keys(tensors, side).items()}
    if side is None:
        return model
    payload = {k: v for k, v in side.items() if k != "layout"}
    payload["model"] = model
    payload["rng"] = [rng_state(tensors[key]) for key in saved_rng_keys(tensors)]
    if side.get("optimizer"):
        payload["optimizer"] = unflatten_optimizer(tensors, side["optimizer"])
    return payload


def _tensor_rows(state: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    return [(name, "x".join(map(str, t.shape)) or "scalar", str(t.dtype).replace("torch.", ""),
             t.numel() * t.element_size() / 2**20)
            for name, t in state.items() if isinstance(t, torch.Tensor)]


def _inspect_folder(path: Path) -> dict[str, Any]:
    """A sharded folder, from its index and sidecar alone (no tensor data is read)."""
    entries, sidecar = sharded_load.open_folder(path)
    model = {name: entries[key] for name, key in sorted(model_keys(entries, sidecar).items())}
    rows = [(name, "x".join(map(str, m.size)) or "scalar", str(m.properties.dtype).replace("torch.", ""),
             torch.Size(m.size).numel() * m.properties.dtype.itemsize / 2**20) for name, m in model.items()]
    files = sorted(p.name for p in path.glob("*.distcp"))
    meta = (sidecar or {}).get("meta", {})
    info: dict[str, Any] = {
        "file": str(path), "bytes": sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        "format": f"sharded (torch.distributed.checkpoint): {len(files)} shard files from "
                  f"{meta.get('world_size', '?')} ranks, every file present and whole",
        "tensors": rows, "parameters": sum(torch.Size(m.size).numel() for m in model.values()),
    }
    if sidecar is None:
        info["format"] += " (foreign: no trainfleet.pt, model weights only)"
        return info
    layout = sidecar.get("optimizer")
    info.update(meta=meta, data=sidecar.get("data"), extra=sidecar.get("extra", {}),
                scheduler=sidecar.get("scheduler") is not None,
                optimizer=f"state for {len(layout['state_keys'])} parameters" if layout else None)
    return info


def inspect_checkpoint(path: str | os.PathLike[str], trust: bool = False) -> dict[str, Any]:
    """Metadata and a tensor table of a checkpoint file or sharded folder, for ``trainfleet ckpt inspect``."""
    path = resolve(path)
    if is_sharded(path):
        return _inspect_folder(path)
    payload = foreign.read(path, trust=trust)
    native = isinstance(payload, dict) and payload.get("format") == FORMAT
    state = extract_model_state(payload, path)
    files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
    info: dict[str, Any] = {
        "file": str(path), "bytes": sum(p.stat().st_size for p in files),
        "format": f"trainfleet v{payload['version']}" if native else _foreign_format(payload),
        "tensors": _tensor_rows(state),
        "parameters": sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor)),
    }
    if not native and payload.get("extra"):
        info["extra"] = {k: v for k, v in payload["extra"].items() if k not in ("args", "hyper_parameters")}
        for key in ("args", "hyper_parameters"):
            if payload["extra"].get(key):
                info["extra"][key] = sorted(payload["extra"][key])  # the names; the values can be long
    if not native and (payload.get("optimizer") or payload.get("scheduler")):
        optimizer = payload.get("optimizer")
        info["optimizer"] = f"state for {len(optimizer['state'])} parameters" if optimizer else None
        info["scheduler"] = payload.get("scheduler") is not None
    if native:
        info["meta"] = payload.get("meta", {})
        info["data"] = payload.get("data")
        info["extra"] = payload.get("extra", {})
        optimizer = payload.get("optimizer")
        info["optimizer"] = f"state for {len(optimizer['state'])} parameters" if optimizer else None
        info["scheduler"] = payload.get("scheduler") is not None
    return info


FOREIGN_NAMES = {"timm": "timm training checkpoint", "lightning": "PyTorch Lightning checkpoint",
                 "safetensors": "safetensors", "hf-sharded": "sharded Hugging Face weights (index + shards)",
                 "hf": "Hugging Face weights folder", "accelerate": "Accelerate save_state folder",
                 "state_dict": "state_dict"}


def _foreign_format(payload: dict[str, Any]) -> str:
    return f"{FOREIGN_NAMES.get(payload.get('source'), 'foreign')} (converted on load)"


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_checkpoint`."""
    checked = "every shard checked against the index" if info["format"].startswith("sharded") \
        else "header checked" if info["format"].startswith("safetensors") else "CRC32 records verified"
    lines = [f"file:       {info['file']} ({info['bytes'] / 2**20:.2f} MB, {checked})",
             f"format:     {info['format']}"]
    meta = info.get("meta")
    if meta:
        versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
        lines.append(f"saved from: world size {meta.get('world_size')}, strategy {meta.get('strategy')}, "
                     f"precision {meta.get('precision')}; {versions}")
    if info.get("data"):
        d = info["data"]
        lines.append(f"data:       epoch {d['epoch']}, {d['consumed']} samples consumed of this epoch "
                     f"(global batch {d['global_batch_size']}, dataset {d['num_samples']}, seed {d['seed']})")
    if info.get("extra"):
        lines.append("extra:      " + ", ".join(f"{k}={v!r}" for k, v in info["extra"].items()))
    if "optimizer" in info:
        lines.append(f"optimizer:  {info['optimizer'] or 'none'}; scheduler: {'yes' if info['scheduler'] else 'no'}")
    lines.append(f"model:      {len(info['tensors'])} tensors, {info['parameters']:,} values")
    width = max([len(r[0]) for r in info["tensors"]] + [4])
    lines.append(f"  {'name':<{width}}  {'shape':<16} {'dtype':<9} {'MB':>9}")
    lines += [f"  {n:<{width}}  {s:<16} {d:<9} {mb:>9.3f}" for n, s, d, mb in info["tensors"]]
    return "\n".join(lines)


def _as_native(payload: Any, src: str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return dict(payload)
    foreign = payload if isinstance(payload, dict) and payload.get("format") == "foreign" else {}
    return {"format": FORMAT, "version": FORMAT_VERSION,
            "model": to_cpu(extract_model_state(payload, src)), "optimizer": foreign.get("optimizer"),
            "scheduler": foreign.get("scheduler"), "precision": {}, "data": None, "rng": None,
            "meta": {"converted_from": str(src), "source": foreign.get("source", "state_dict"),
                     "versions": library_versions()},
            "extra": _plain(foreign.get("extra") or {})}


def _plain(extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` with what a weights-only load cannot read back (a Namespace, paths) as text."""
    def simple(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): simple(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [simple(v) for v in value]
        return value if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)) else str(value)
    return simple(extra)


CONVERT_TO = ("file", "sharded", "state_dict", "safetensors")


def convert_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], to_state_dict: bool = False,
                       trust: bool = False, to: str | None = None, ema: bool = False, prefix: str | None = None,
                       max_shard_size: int | None = None) -> Path:
    """Convert between checkpoint layouts.

    Args:
        to: ``"file"`` (a trainfleet file, the default), ``"sharded"`` (a folder any number of
            ranks load their shards from), ``"state_dict"`` (a plain state_dict for other tools)
            or ``"safetensors"`` (weights only; a folder of shards with an index above
            ``max_shard_size`` bytes). ``src`` may be any of these, or a foreign checkpoint
            (see :func:`foreign.read`).
        to_state_dict: the same as ``to="state_dict"``.
        ema: take timm's EMA weights. prefix: keep the keys under this attribute, without it.

    Raises:
        UsageError: an unknown ``to``, ``max_shard_size`` without safetensors, or anything
            :func:`read_checkpoint` refuses.
    """
    to = "state_dict" if to_state_dict else (to or "file")
    if to not in CONVERT_TO:
        raise UsageError(f"--to {to!r}: expected one of {list(CONVERT_TO)}.")
    if max_shard_size is not None and to != "safetensors":
        raise UsageError(f"--max-shard-size applies to --to safetensors, not --to {to}.", "add --to safetensors.")
    payload = read_checkpoint(src, trust=trust, ema=ema)
    if prefix:
        model = strip_prefix(extract_model_state(payload, src), set(), prefix)
        payload = {**payload, "model": model} if isinstance(payload, dict) and "model" in payload else model
    if to == "safetensors":
        return foreign.save_safetensors(extract_model_state(payload, src), dst, max_shard_size,
                                        metadata={"converted_from": Path(src).name})
    if to == "state_dict":
        return save_atomic(to_cpu(extract_model_state(payload, src)), dst)
    native = _as_native(payload, src)
    if to == "file":
        return save_atomic(native, dst)
    tensors, layout = flatten(native.pop("model"), native.pop("optimizer"))
    tensors.update((rng_key(rank), rng_tensor(state))
                   for rank, state in enumerate(native.get("rng") or []))
    return write_folder(tensors, make_sidecar(native, layout), Path(dst))
