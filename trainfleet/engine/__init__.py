"""The training engine: strategies, precision, data sharding, checkpoints.

Names load lazily so ``import trainfleet.engine.registry`` stays torch-free.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "trainfleet.engine.engine",
    "seed_everything": "trainfleet.engine.engine",
    "Strategy": "trainfleet.engine.strategy",
    "build_strategy": "trainfleet.engine.strategy",
    "Precision": "trainfleet.engine.precision",
    "ClusterEnvironment": "trainfleet.engine.environment",
    "GlobalOrderSampler": "trainfleet.engine.data",
    "DatasetShapeError": "trainfleet.engine.data",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
