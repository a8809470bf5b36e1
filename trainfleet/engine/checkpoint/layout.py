"""The names and places of checkpoints, torch-free: the format tag, ``latest.json``, what makes
a folder a sharded (DCP) checkpoint or a Hugging Face / Accelerate one, and which checkpoint a
path means (:func:`resolve`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainfleet.engine.checkpoint.temporaries import restore_orphans
from trainfleet.utils.errors import UsageError

FORMAT = "trainfleet"
FORMAT_VERSION = 1
MANIFEST = "latest.json"
DCP_METADATA = ".metadata"  # what makes a folder a torch.distributed.checkpoint (sharded) checkpoint
SIDECAR = "trainfleet.pt"
SAFETENSORS = ".safetensors"
INDEX_SUFFIX = ".index.json"
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")  # HF and Accelerate, model 0
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
ACCELERATE_MARKERS = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def is_sharded(path: Path) -> bool:
    """True for a sharded (DCP) checkpoint folder."""
    return path.is_dir() and (path / DCP_METADATA).is_file()


def folder_kind(path: Path) -> str | None:
    """``"hf-sharded"``, ``"accelerate"`` or ``"hf"`` for a folder this module reads, else None."""
    if not path.is_dir():
        return None
    if any((path / name).is_file() for name in INDEX_FILES):
        return "hf-sharded"
    if any((path / name).is_file() for name in MODEL_FILES):
        return "accelerate" if any((path / m).is_file() for m in ACCELERATE_MARKERS) else "hf"
    return None


def is_safetensors(path: Path) -> bool:
    """A safetensors file: by suffix, or by its header (8-byte length, then a JSON object)."""
    if path.suffix == SAFETENSORS:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def resolve(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file or sharded folder, or the one a folder's ``latest.json`` points at."""
    path = Path(path)
    if not path.exists() and path.parent.is_dir():
        restore_orphans(path.parent)  # a save that replaced it died between its two renames
    if path.is_dir() and not is_sharded(path):
        manifest = path / MANIFEST
        if not manifest.is_file():
            if folder_kind(path) is not None:  # HF (sharded) weights, an Accelerate save_state folder
                return path
            raise UsageError(f"{str(path)!r} is a folder without a {MANIFEST}, a {DCP_METADATA}, a model.safetensors"
                             "(.index.json) or a pytorch_model.bin(.index.json).",
                             "pass a checkpoint file, a sharded checkpoint folder, a folder written with "
                             "keep_last=, or a Hugging Face / Accelerate folder.")
        latest = path / read_manifest(path)["latest"]
        if not latest.exists():
            restore_orphans(path)  # a save that replaced it died between its two renames
        return latest
    return path


def _plain_name(value: object) -> bool:
    """A name of an entry directly inside the folder: no separator, not '.', '..' or hidden."""
    return (isinstance(value, str) and bool(value) and not value.startswith(".")
            and not any(ch in value for ch in ("/", "\\", "\0")))


def read_manifest(folder: Path) -> dict[str, Any]:
    """``latest.json`` of ``folder``, checked: it names entries of this folder and nothing else
    (a downloaded run folder must not make a save delete, or a load read, anything outside it).

    Returns:
        ``{"latest": NAME, "checkpoints": [NAME, ...]}``

    Raises:
        UsageError: the file is not such a manifest.
    """
    manifest = folder / MANIFEST
    hint = "this manifest was not written by trainfleet: delete it (the checkpoints stay), or fix its names."
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{str(manifest)!r} is not a readable manifest ({err}).", hint) from err
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints", []), list):
        raise UsageError(f"{str(manifest)!r} is not a manifest: expected {{\"latest\": NAME, \"checkpoints\": "
                         f"[NAME, ...]}}, found {type(data).__name__}.", hint)
    history = list(data.get("checkpoints", []))
    for name in [data.get("latest"), *history]:
        if not _plain_name(name):
            raise UsageError(f"{str(manifest)!r} names {name!r}: expected the name of a checkpoint in "
                             f"{str(folder)!r} (no '/', '..', hidden or absolute names).", hint)
    return {"latest": data["latest"], "checkpoints": history}
