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
        dtype = getattr(self.precision, "dtype", None)
        if dtype is not None:
            module = AutocastInReplicas(module, dtype)
        return torch.nn.DataParallel(module, device_ids=list(range(torch.cuda.device_count())))


class AutocastInReplicas(torch.nn.Module):
    """Runs the module's forward under autocast with ``dtype`` whenever its thread has autocast on.

    DataParallel runs each replica on a thread of its own and re-enters autocast there with the
    device's default dtype (fp16 on CUDA) rather than the caller's: bf16 would silently run as
    fp16, without a loss scaler. ``engine.unwrap`` sees through it (``.module``).
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args, **kwargs):
        device_type = next((p.device.type for p in self.module.parameters()), "cpu")
        if not torch.is_autocast_enabled(device_type):
            return self.module(*args, **kwargs)
        with torch.autocast(device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)
