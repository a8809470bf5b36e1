"""Checkpoint files: unwrapped, on CPU, written atomically, loaded weights-only.

Saving writes a temporary file beside the target, fsyncs it, renames it over the
target and fsyncs the folder, so a crash at any moment leaves the previous file
intact (fvcore ``Checkpointer``). Loading uses ``weights_only=True``: a file that
needs arbitrary unpickling is refused unless the caller trusts it.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from trainfleet.utils.errors import UsageError

FORMAT = "trainfleet"
FORMAT_VERSION = 1
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return type(obj)((key, to_cpu(value)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


def clean_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """Strip ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) from keys."""
    cleaned = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key.replace("._orig_mod.", ".")] = value  # a compiled submodule
    return cleaned


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to ``path`` through a temporary file, fsync and rename.

    Returns:
        The final path. On any error the temporary file is removed and the
        previous content of ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_file(path: str | os.PathLike[str], map_location: Any = "cpu", trust: bool = False) -> Any:
    """Load a checkpoint file, weights-only unless ``trust`` is set.

    Raises:
        UsageError: the file is missing, truncated or corrupt, or needs full unpickling
            and ``trust`` is False.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist.", "check the path.")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f"it pickles {found.group(1)}" if found else "it contains pickled objects"
            raise UsageError(
                f"refusing to load {str(path)!r}: it is not a weights-only checkpoint ({what}, "
                "which could run code on load).",
                "if you trust this file, pass trust=True (--trust-pickle).",
            ) from err
        raise UsageError(f"checkpoint {str(path)!r} is corrupt: {err}") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise UsageError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({type(err).__name__}: {err}).",
            "re-save it, or load an earlier checkpoint.",
        ) from err


def extract_model_state(payload: Any, path: str | os.PathLike[str] = "<checkpoint>") -> dict[str, Any]:
    """The model state_dict inside a trainfleet checkpoint or a common foreign layout."""
    if isinstance(payload, Mapping):
        if payload.get("format") == FORMAT:
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
                      path: str | os.PathLike[str] = "<checkpoint>") -> dict[str, list[str]]:
    """Load ``state`` into ``module``, reporting what matched.

    Keys whose shape differs from the module's are never loaded. With ``strict``
    any missing, unexpected or wrong-shape key is an error naming the file.

    Returns:
        ``{"loaded": [...], "missing": [...], "unexpected": [...], "mismatched": [...]}``
    """
    own = module.state_dict()
    state = clean_state_dict(state)
    mismatched = [k for k, v in state.items()
                  if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    report = {
        "loaded": sorted(usable),
        "missing": sorted(k for k in own if k not in state),
        "unexpected": sorted(k for k in state if k not in own),
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
    module.load_state_dict(usable, strict=False)
    return report
