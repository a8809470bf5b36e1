"""One process on one device."""
from __future__ import annotations

import torch

from trainfleet.engine.environment import resolve_accelerator
from trainfleet.engine.strategy import SingleProcessStrategy


class SingleDeviceStrategy(SingleProcessStrategy):
    """Runs on ``cuda:0`` when CUDA is available (and allowed), else on the CPU."""

    name = "single"

    @property
    def root_device(self) -> torch.device:
        kind = resolve_accelerator(self.accelerator, torch.cuda.device_count())
        return torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")

    def _setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module
