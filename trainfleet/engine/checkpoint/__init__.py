"""Checkpoints: one package, one module per concern.

- :mod:`.layout`: format names, ``latest.json``, what a path means (:func:`resolve`); torch-free.
- :mod:`.keys`: wrapper prefixes, key and shape matching, the load report.
- :mod:`.files`: atomic writes, CRC-checked weights-only loads, ``latest.json``/``keep_last``,
  the background saver.
- :mod:`.sharded` / :mod:`.sharded_load`: torch.distributed.checkpoint folders, written by
  every rank, read at any world size.
- :mod:`.foreign`: timm, Lightning, safetensors, Hugging Face, Accelerate.
- :mod:`.training_state`: optimizer state by parameter name, per-rank RNG.
- :mod:`.tools`: ``trainfleet ckpt inspect|convert`` and :func:`load_state_dict`.
- :mod:`.checkpointer`: what ``Engine.save``/``load``/``resume`` delegate to.

The names the former ``trainfleet.engine.checkpoint`` module had are still importable from here
(loaded on first use, so ``import trainfleet.engine.checkpoint.layout`` stays torch-free).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    **dict.fromkeys(("FORMAT", "FORMAT_VERSION", "MANIFEST", "DCP_METADATA", "is_sharded", "resolve"), "layout"),
    **dict.fromkeys(("WRAPPER_PREFIXES", "clean_state_dict", "strip_prefix", "extract_model_state",
                     "apply_model_state", "compare_keys"), "keys"),
    **dict.fromkeys(("to_cpu", "remove_stale_temporaries", "remove_path", "fsync_dir", "save_atomic", "commit_folder",
                     "record_latest", "AsyncSaver", "SAFE_GLOBALS", "load_file"), "files"),
    "load_state_dict": "tools",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
