"""Matching saved keys to a model: wrapper prefixes (``module.``, ``_orig_mod.``) cleaned, a
submodule prefix (Lightning's ``model.``) detected, shapes compared, and one report of what
loaded, what was missing, unexpected or of another shape.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch

from trainfleet.engine.checkpoint.layout import FORMAT
from trainfleet.utils.errors import UsageError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def clean_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """Strip ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) from keys."""
    cleaned = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key.replace("._orig_mod.", ".")] = value  # a compiled submodule
    return cleaned


def strip_prefix(state: Mapping[str, Any], own_keys: set[str], prefix: str | None = None) -> dict[str, Any]:
    """``state`` with a submodule prefix removed: ``prefix`` when named, else the one (up to three
    levels, e.g. Lightning's ``model.``) under which the keys match ``own_keys``, if no key matches as is.

    Raises:
        UsageError: a named prefix that no key starts with.
    """
    if prefix:
        lead = prefix if prefix.endswith(".") else prefix + "."
        kept = {k[len(lead):]: v for k, v in state.items() if k.startswith(lead)}
        if not kept:
            raise UsageError(f"prefix {lead!r}: no key of the checkpoint starts with it (first keys: "
                             f"{list(state)[:3]}).", "name the attribute that holds the model, e.g. 'model.'.")
        return kept
    if not own_keys or own_keys & state.keys():
        return dict(state)
    candidates = {".".join(k.split(".")[:depth]) + "." for k in state for depth in (1, 2, 3)
                  if k.count(".") >= depth}
    scored = [(sum(k.startswith(c) and k[len(c):] in own_keys for k in state), c) for c in candidates]
    hits, best = max(scored, default=(0, ""))
    if hits == 0:
        return dict(state)
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}


def extract_model_state(payload: Any, path: str | os.PathLike[str] = "<checkpoint>") -> dict[str, Any]:
    """The model state_dict inside a trainfleet checkpoint or a common foreign layout."""
    if isinstance(payload, torch.nn.Module):  # a whole pickled model, loaded with trust=True
        return clean_state_dict(payload.state_dict())
    if isinstance(payload, Mapping):
        if payload.get("format") in (FORMAT, "foreign"):
            return dict(payload["model"])
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(payload.get(key), Mapping):
                return clean_state_dict(payload[key])
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            return clean_state_dict(payload)
    raise UsageError(
        f"{str(path)!r} holds no model state_dict (found {type(payload).__name__}).",
        "expected a trainfleet checkpoint, a state_dict, or a dict with 'state_dict'/'model'.",
    )


def apply_model_state(module: torch.nn.Module, state: Mapping[str, Any], strict: bool = True,
                      path: str | os.PathLike[str] = "<checkpoint>",
                      load: Callable[[dict[str, Any]], Any] | None = None,
                      prefix: str | None = None) -> dict[str, list[str]]:
    """Load ``state`` into ``module``, reporting what matched.

    Keys whose shape differs from the module's are never loaded. With ``strict``
    any missing, unexpected or wrong-shape key is an error naming the file.
    ``load(matching)`` does the loading (a strategy's, for sharded modules); by default
    ``module.load_state_dict(matching, strict=False)``. ``prefix`` names the attribute the
    weights sit under (Lightning's ``model.``); by default it is detected (:func:`strip_prefix`).

    Returns:
        ``{"loaded": [...], "missing": [...], "unexpected": [...], "mismatched": [...]}``
    """
    state = strip_prefix(clean_state_dict(state), set(module.state_dict()), prefix)
    shapes = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    report = compare_keys(module, shapes, [k for k in state if k not in shapes], strict, path)
    matching = {k: state[k] for k in report["loaded"]}
    if load is None:
        module.load_state_dict(matching, strict=False)
    else:
        load(matching)
    return report


def compare_keys(module: torch.nn.Module, saved_shapes: Mapping[str, tuple[int, ...]],
                 saved_other: Any = (), strict: bool = True,
                 path: str | os.PathLike[str] = "<checkpoint>") -> dict[str, list[str]]:
    """Match saved keys and shapes against ``module``'s (global shapes for sharded modules).

    Returns:
        ``{"loaded": [...], "missing": [...], "unexpected": [...], "mismatched": [...]}``

    Raises:
        UsageError: ``strict`` and any key is missing, unexpected or of another shape.
    """
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    saved_keys = set(saved_shapes) | set(saved_other)
    mismatched = [k for k, shape in saved_shapes.items() if k in own and shape != own[k]]
    report = {
        "loaded": sorted(k for k in saved_keys if k in own and k not in mismatched),
        "missing": sorted(k for k in own if k not in saved_keys),
        "unexpected": sorted(k for k in saved_keys if k not in own),
        "mismatched": sorted(mismatched),
    }
    problems = {name: keys for name, keys in report.items() if name != "loaded" and keys}
    if strict and problems:
        details = "; ".join(
            f"{name}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
            for name, keys in problems.items())
        raise UsageError(
            f"checkpoint {str(path)!r} does not match {type(module).__name__}: {details}.",
            "is it a checkpoint of another model? Load with strict=False to take what matches.",
        )
    return report
