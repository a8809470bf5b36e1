"""The names and places of checkpoints, torch-free: the format tag, ``latest.json``, what makes
a folder a sharded (DCP) checkpoint or a Hugging Face / Accelerate one, and which checkpoint a
path means (:func:`resolve`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

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
    if path.is_dir() and not is_sharded(path):
        manifest = path / MANIFEST
        if not manifest.is_file():
            if folder_kind(path) is not None:  # HF (sharded) weights, an Accelerate save_state folder
                return path
            raise UsageError(f"{str(path)!r} is a folder without a {MANIFEST}, a {DCP_METADATA}, a model.safetensors"
                             "(.index.json) or a pytorch_model.bin(.index.json).",
                             "pass a checkpoint file, a sharded checkpoint folder, a folder written with "
                             "keep_last=, or a Hugging Face / Accelerate folder.")
        return path / json.loads(manifest.read_text())["latest"]
    return path


# ----- writing -----------------------------------------------------------------------------------
def temporary_name(path: Path, pid: int, tag: object) -> str:
    """The hidden name a folder is written under; ``remove_stale_temporaries`` reads the writer's pid from it."""
    return f".{path.name}.tmp-{pid}-{tag}"
