"""Checkpoint tools behind ``trainfleet ckpt`` and ``trainfleet.load_state_dict``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from trainfleet.engine import checkpoint as ckpt


def load_state_dict(path: str | os.PathLike[str], map_location: Any = None,
                    trust: bool = False) -> dict[str, torch.Tensor]:
    """A plain model state_dict from any checkpoint, on the current device.

    Accepts trainfleet checkpoints, plain state_dicts, dicts holding
    ``state_dict``/``model``/``model_state_dict``, and DP/DDP/compiled ones (prefixes
    stripped). Tensors saved on any ``cuda:N`` or the CPU land on ``map_location``:
    by default the current CUDA device, or the CPU without one.

    Raises:
        UsageError: missing, corrupt or non-weights-only file (unless ``trust``), or no
            model state inside.
    """
    payload = ckpt.load_file(path, map_location="cpu", trust=trust)
    state = ckpt.extract_model_state(payload, path)
    if map_location is None:
        map_location = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return {k: v.to(map_location) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _tensor_rows(state: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    return [(name, "x".join(map(str, t.shape)) or "scalar", str(t.dtype).replace("torch.", ""),
             t.numel() * t.element_size() / 2**20)
            for name, t in state.items() if isinstance(t, torch.Tensor)]


def inspect_checkpoint(path: str | os.PathLike[str], trust: bool = False) -> dict[str, Any]:
    """Metadata and a tensor table of a checkpoint, for ``trainfleet ckpt inspect``."""
    path = ckpt.resolve(path)
    payload = ckpt.load_file(path, trust=trust)
    native = isinstance(payload, dict) and payload.get("format") == ckpt.FORMAT
    state = ckpt.extract_model_state(payload, path)
    info: dict[str, Any] = {
        "file": str(path), "bytes": path.stat().st_size,
        "format": f"trainfleet v{payload['version']}" if native else "foreign (converted on load)",
        "tensors": _tensor_rows(state),
        "parameters": sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor)),
    }
    if native:
        info["meta"] = payload.get("meta", {})
        info["data"] = payload.get("data")
        info["extra"] = payload.get("extra", {})
        optimizer = payload.get("optimizer")
        info["optimizer"] = f"state for {len(optimizer['state'])} parameters" if optimizer else None
        info["scheduler"] = payload.get("scheduler") is not None
    return info


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_checkpoint`."""
    lines = [f"file:       {info['file']} ({info['bytes'] / 2**20:.2f} MB, CRC32 records verified)",
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


def convert_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], to_state_dict: bool = False,
                       trust: bool = False) -> Path:
    """Write a foreign checkpoint as a trainfleet one, or any checkpoint as a plain state_dict."""
    payload = ckpt.load_file(src, trust=trust)
    state = ckpt.to_cpu(ckpt.extract_model_state(payload, src))
    if to_state_dict:
        return ckpt.save_atomic(state, dst)
    from trainfleet.engine.state import library_versions

    native = isinstance(payload, dict) and payload.get("format") == ckpt.FORMAT
    converted = dict(payload) if native else {
        "format": ckpt.FORMAT, "version": ckpt.FORMAT_VERSION, "model": state, "optimizer": None,
        "scheduler": None, "precision": {}, "data": None, "rng": None,
        "meta": {"converted_from": str(src), "versions": library_versions()}, "extra": {},
    }
    return ckpt.save_atomic(converted, dst)
