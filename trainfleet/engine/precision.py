"""Precision components held by every strategy.

A strategy delegates the numeric parts of a step (module conversion, forward
context, backward, optimizer step) to its :class:`Precision`, so adding mixed
precision never multiplies the strategy classes.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from trainfleet.engine.registry import PRECISIONS


class Precision:
    """Full fp32 precision; the base every other precision overrides in parts."""

    name = "32"

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Cast the module for this precision (fp32: unchanged)."""
        return module

    def forward_context(self) -> ContextManager[Any]:
        """Context the forward pass runs under (autocast for mixed precision)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass; mixed precision scales the loss here."""
        loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer. Returns False when the step was skipped (inf/NaN grads)."""
        optimizer.step()
        return True

    def state_dict(self) -> dict[str, Any]:
        """Precision state for checkpoints (a loss scaler's scale, for instance)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def build_precision(name: str | Precision | None) -> Precision:
    """A precision instance from a name (``"32"``), an instance, or None (fp32)."""
    if isinstance(name, Precision):
        return name
    return PRECISIONS.get(str(name or "32"))()
