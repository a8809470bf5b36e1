"""Precision components held by every strategy (fp32, autocast, Apex-style O0-O3).

A strategy delegates the numeric parts of a step (module conversion, forward
context, backward, optimizer step) to its :class:`Precision`, so mixed precision
never multiplies the strategy classes. Apex's opt levels map onto ``torch.amp``:

- ``O0``: fp32.
- ``O1``: autocast to fp16 with dynamic loss scaling (``16-mixed``).
- ``O2``: the model in fp16 (BatchNorm kept in fp32), fp32 master weights that the
  optimizer steps, dynamic loss scaling.
- ``O3``: the model and the optimizer in pure fp16, no loss scaling.

``apex.amp`` itself was removed upstream in 2025; the native mapping is the default
and ``amp_backend="apex"`` uses ``apex.amp`` only where an older apex provides it.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from trainfleet.engine.registry import PRECISIONS
from trainfleet.utils.errors import UsageError


class Precision:
    """Full fp32 precision; the base every other precision overrides in parts."""

    name = "32"

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.skipped_steps = 0

    def attach(self, device: torch.device) -> None:
        """Called by the strategy once the device is known."""
        self.device = device

    def connect(self, module: torch.nn.Module, optimizer: Any) -> tuple[torch.nn.Module, Any]:
        """Bind to the model and optimizer before the strategy wraps them (Apex needs this)."""
        return module, optimizer

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Cast the module for this precision (fp32: unchanged)."""
        return module

    def forward_context(self) -> ContextManager[Any]:
        """Context the forward pass runs under (autocast for mixed precision)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass; loss scaling happens here."""
        loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer. Returns False when the step was skipped (inf/NaN grads)."""
        optimizer.step()
        return True

    def optimizer_params(self, optimizer: torch.optim.Optimizer) -> ContextManager[Any]:
        """Context in which the optimizer's parameters hold what it steps (O2: fp32 masters)."""
        return contextlib.nullcontext()

    def module_state(self, module: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """The model state to checkpoint (O2 puts its fp32 master weights here)."""
        return state

    def load_module_state(self, module: torch.nn.Module, state: dict[str, Any]) -> None:
        """Take what :meth:`module_state` saved after the model loaded it (O2: masters)."""

    def state_dict(self) -> dict[str, Any]:
        """Precision state for checkpoints (loss scale, skipped steps)."""
        return {"skipped_steps": self.skipped_steps} if self.skipped_steps else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.skipped_steps = int(state.get("skipped_steps", 0))


class AutocastPrecision(Precision):
    """``torch.autocast`` for the forward pass; fp16 adds a GradScaler (bf16 needs none).

    Args:
        dtype: ``torch.float16`` or ``torch.bfloat16``.
        name: the registered name reported in checkpoints.
    """

    def __init__(self, dtype: torch.dtype, name: str):
        super().__init__()
        self.dtype, self.name = dtype, name
        self.scaler: torch.amp.GradScaler | None = None

    def attach(self, device: torch.device) -> None:
        super().attach(device)
        if self.dtype == torch.float16 and self.scaler is None:
            self.scaler = torch.amp.GradScaler(device.type)

    def forward_context(self) -> ContextManager[Any]:
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        if self.scaler is None:
            optimizer.step()
            return True
        # The one host sync of a scaled step is GradScaler's own check for inf/NaN before it steps:
        # unscaling first lets this read the same flags at the same point, right after it (asking
        # the scale afterwards would also wait for the optimizer's kernels, at every step).
        self.scaler.unscale_(optimizer)
        found = self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        stepped = not sum(flag.item() for flag in found.values())
        self.scaler.step(optimizer)
        self.scaler.update()
        self.skipped_steps += not stepped
        return stepped

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(v, dtype) for v in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


class HalfModelPrecision(Precision):
    """Apex O2/O3: the model runs in fp16; inputs are cast to fp16 and outputs to fp32.

    With ``master_weights`` (O2) the optimizer steps fp32 copies of the parameters: for
    the step each parameter's data is swapped for its master and its gradient for an
    unscaled fp32 copy, so the optimizer (and its DDP/Horovod hooks) keep seeing the
    model's own parameters and its state is fp32. Dynamic loss scaling skips steps
    with inf/NaN gradients, halves the scale, and doubles it after ``growth_interval``
    clean steps.
    """

    def __init__(self, name: str, master_weights: bool, keep_batchnorm_fp32: bool, dynamic_scale: bool,
                 init_scale: float = 2.0**16, growth_interval: int = 2000):
        super().__init__()
        self.name, self.master_weights = name, master_weights
        self.keep_batchnorm_fp32, self.dynamic_scale = keep_batchnorm_fp32, dynamic_scale
        self.scale = init_scale if dynamic_scale else 1.0
        self.growth_interval, self._clean_steps = growth_interval, 0
        self.masters: dict[torch.nn.Parameter, torch.Tensor] = {}

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.master_weights:  # exact fp32 copies, taken before the cast
            self.masters = {p: p.detach().float().clone() for p in module.parameters()}
        module.half()
        if self.keep_batchnorm_fp32:
            for child in module.modules():
                if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                    child.float()
        module.register_forward_pre_hook(lambda _m, args, kwargs: (_cast_floats(args, torch.float16),
                                                                    _cast_floats(kwargs, torch.float16)),
                                         with_kwargs=True)
        module.register_forward_hook(lambda _m, _args, output: _cast_floats(output, torch.float32))
        return module

    def backward(self, loss: torch.Tensor) -> None:
        (loss.float() * self.scale).backward()

    def _unscaled_grads(self, params: list[torch.nn.Parameter]) -> dict[torch.nn.Parameter, torch.Tensor] | None:
        """fp32 gradients divided by the scale, or None if any is inf/NaN. One fused kernel per
        device and one device-to-host sync per step (GradScaler's own check), not one per parameter."""
        grads = {p: p.grad.float() for p in params}
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for grad in grads.values():
            by_device.setdefault(grad.device, []).append(grad)
        found = []
        for device, tensors in by_device.items():
            found_inf = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                tensors, found_inf, torch.full((1,), 1.0 / self.scale, device=device))
            found.append(found_inf)
        if found and bool(torch.stack([f.cpu() for f in found]).sum() > 0):
            return None
        return grads

    def _update_scale(self, finite: bool) -> None:
        if not self.dynamic_scale:
            return
        if not finite:
            self.scale, self._clean_steps = self.scale / 2, 0
            return
        self._clean_steps += 1
        if self._clean_steps >= self.growth_interval:
            self.scale, self._clean_steps = self.scale * 2, 0

    @contextlib.contextmanager
    def optimizer_params(self, optimizer: torch.optim.Optimizer):
        """Swap every parameter's fp16 data for its fp32 master; on exit copy back, rounded.

        Inside, the optimizer steps (and loads its state) in fp32: torch's
        ``load_state_dict`` casts state to the parameters' dtype.
        """
        if not self.master_weights:
            yield
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        halves = {}
        for p in params:
            halves[p], p.data = p.data, self.masters.setdefault(p, p.detach().float())
        try:
            yield
        finally:
            for p in params:
                self.masters[p] = p.data
                p.data = halves[p].copy_(p.data)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        if not self.master_weights:
            optimizer.step()
            return True
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = self._unscaled_grads(params)
        self._update_scale(grads is not None)
        if grads is None:
            self.skipped_steps += 1
            return False
        with self.optimizer_params(optimizer):
            for p in params:
                p.grad = grads[p]
            optimizer.step()
            for p in params:
                p.grad = None
        return True

    def module_state(self, module: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        if not self.masters:
            return state
        names = {p: name for name, p in module.named_parameters()}
        exported = dict(state)
        for param, master in self.masters.items():
            if names.get(param) in exported:
                exported[names[param]] = master
        return exported

    def load_module_state(self, module: torch.nn.Module, state: dict[str, Any]) -> None:
        if not self.master_weights:
            return
        for name, param in module.named_parameters():
            if name in state:
                self.masters[param] = state[name].detach().to(param.device, torch.float32).clone()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scale": self.scale, "clean_steps": self._clean_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scale = float(state.get("scale", self.scale))
        self._clean_steps = int(state.get("clean_steps", 0))


class ApexPrecision(Precision):
    """NVIDIA Apex's ``amp`` at an opt level, where an apex that still ships it is installed."""

    def __init__(self, opt_level: str):
        super().__init__()
        try:
            from apex import amp  # noqa: F401  (removed from apex in 2025)
        except ImportError as err:
            raise UsageError("--amp-backend apex needs apex.amp, which is not importable here "
                             "(apex removed amp upstream in 2025).",
                             "use the default native backend: the same opt level on torch.amp.") from err
        self.name, self.opt_level = f"apex-{opt_level}", opt_level

    def connect(self, module: torch.nn.Module, optimizer: Any) -> tuple[torch.nn.Module, Any]:
        from apex import amp

        module, self._optimizer = amp.initialize(module.to(self.device), optimizer, opt_level=self.opt_level)
        return module, self._optimizer

    def backward(self, loss: torch.Tensor) -> None:
        from apex import amp

        with amp.scale_loss(loss, self._optimizer) as scaled:
            scaled.backward()


def fp32() -> Precision:
    return Precision()


def fp16_mixed() -> Precision:
    return AutocastPrecision(torch.float16, "16-mixed")


def bf16_mixed() -> Precision:
    return AutocastPrecision(torch.bfloat16, "bf16-mixed")


def apex_o2() -> Precision:
    return HalfModelPrecision("O2", master_weights=True, keep_batchnorm_fp32=True, dynamic_scale=True)


def apex_o3() -> Precision:
    return HalfModelPrecision("O3", master_weights=False, keep_batchnorm_fp32=False, dynamic_scale=False)


OPT_LEVELS = {"32": "O0", "16-mixed": "O1", "O2": "O2", "O3": "O3"}


def build_precision(name: str | Precision | None, amp_backend: str | None = None) -> Precision:
    """A precision instance from a registered name (``"bf16"``, ``"O2"``), an instance, or None.

    Raises:
        UsageError: unknown name or backend, or apex requested where it cannot run.
    """
    if isinstance(name, Precision):
        return name
    precision = PRECISIONS.get(str(name or "32"))()
    backend = (amp_backend or "native").lower()
    if backend == "native":
        return precision
    if backend != "apex":
        raise UsageError(f"Unknown amp backend {amp_backend!r}. Available: ['apex', 'native']")
    if precision.name not in OPT_LEVELS:
        raise UsageError(f"--amp-backend apex supports {sorted(OPT_LEVELS.values())}, not {name!r}.")
    return ApexPrecision(OPT_LEVELS[precision.name])
