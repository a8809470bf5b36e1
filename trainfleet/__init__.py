"""trainfleet: take a PyTorch training script from a laptop to many nodes.

``import trainfleet`` is cheap; ``trainfleet.Engine`` imports torch on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "trainfleet.engine.engine",
    "Strategy": "trainfleet.engine.strategy",
    "Precision": "trainfleet.engine.precision",
    "UsageError": "trainfleet.utils.errors",
    "load_state_dict": "trainfleet.engine.checkpoint.tools",
    "build_model": "trainfleet.models",
    "build_dataset": "trainfleet.datasets",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
