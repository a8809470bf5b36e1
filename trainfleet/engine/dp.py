"""``nn.DataParallel`` over the GPUs of one process; a pass-through on CPU."""
from __future__ import annotations

import torch

from trainfleet.engine.environment import resolve_accelerator
from trainfleet.engine.strategy import SingleProcessStrategy


class DataParallelStrategy(SingleProcessStrategy):
    """Replicates the module over every visible GPU inside one process.

    The batch is scattered along dimension 0 and gradients are summed on
    ``cuda:0`` by DataParallel itself, so the strategy's own collectives are
    identities (one process is the whole world).
    """

    name = "dp"

    def _uses_cuda(self) -> bool:
        return resolve_accelerator(self.accelerator, torch.cuda.device_count()) == "cuda"

    @property
    def root_device(self) -> torch.device:
        return torch.device("cuda", 0) if self._uses_cuda() else torch.device("cpu")

    def _setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self._uses_cuda():
            return module
        return torch.nn.DataParallel(module, device_ids=list(range(torch.cuda.device_count())))
