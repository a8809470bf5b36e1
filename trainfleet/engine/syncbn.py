"""Batch statistics over the global batch: SyncBatchNorm on CUDA, and on CPU workers too.

With plain BatchNorm each worker normalises with the statistics of its own slice of the batch,
so N workers do not train the model one process would at the same global batch. torch's
``nn.SyncBatchNorm`` fixes that on GPUs only (it refuses CPU input). On CPU (gloo) the layers
become :class:`GlobalBatchNorm`: the same statistics through two differentiable all-reduces
(sum and count, then the centred sum of squares), whose backward all-reduces the gradients.
Parameter and buffer names stay those of BatchNorm, so checkpoints move between the two.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce
from torch.nn.modules.batchnorm import _BatchNorm


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover every rank's batch (any device, any backend).

    Outside training, or without an initialised process group of more than one rank, it is
    exactly ``BatchNorm``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _synchronised(self) -> bool:
        return self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self._synchronised():
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        local = torch.cat([x.sum(dims), x.new_full((1,), x.numel() // x.size(1))])
        totals = differentiable_all_reduce(local)
        count = totals[-1]
        mean = totals[:-1] / count
        centred = x - mean.view(shape)
        var = differentiable_all_reduce(centred.square().sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.item())
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1, 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_batchnorm(module: torch.nn.Module, device_type: str) -> tuple[torch.nn.Module, int]:
    """Replace every BatchNorm layer of ``module``: ``nn.SyncBatchNorm`` on CUDA, else
    :class:`GlobalBatchNorm`. Returns the module and how many layers were converted."""
    if device_type == "cuda":
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return converted, sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    return _to_global(module)


def _to_global(module: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    count = 0
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, torch.nn.SyncBatchNorm)):
        replacement = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats, device="meta")
        # The same Parameter and buffer objects (as nn.SyncBatchNorm.convert_sync_batchnorm does):
        # an optimizer built before engine.setup keeps updating them.
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(replacement, name, tensor)
        replacement.train(module.training)
        return replacement, 1
    for name, child in module.named_children():
        new, converted = _to_global(child)
        if new is not child:
            module.add_module(name, new)
        count += converted
    return module, count

