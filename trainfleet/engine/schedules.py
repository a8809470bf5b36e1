"""Learning-rate schedules counted in optimizer steps, with optional linear warm-up.

Every schedule except ``plateau`` is a :class:`torch.optim.lr_scheduler.LambdaLR`
over a :class:`StepSchedule`, a plain object whose state (numbers and lists only)
saves into a weights-only checkpoint. ``plateau`` reacts to a metric and is stepped
once per epoch.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from trainfleet.utils.errors import UsageError

SCHEDULES = ("none", "step", "multistep", "exponential", "cosine", "plateau", "poly")


@dataclass
class StepSchedule:
    """LR factor as a function of the optimizer step (LambdaLR's ``lr_lambda``)."""

    kind: str
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int = 0
    gamma: float = 0.1
    step_size: int = 30  # epochs
    milestones: list[int] = field(default_factory=list)  # epochs
    power: float = 1.0
    min_factor: float = 0.0

    def _decay(self, step: int) -> float:
        epoch = step // max(self.steps_per_epoch, 1)
        if self.kind == "step":
            return self.gamma ** (epoch // self.step_size)
        if self.kind == "multistep":
            return self.gamma ** bisect.bisect_right(sorted(self.milestones), epoch)
        if self.kind == "exponential":
            return self.gamma ** epoch
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        if self.kind == "cosine":
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "poly":
            return self.min_factor + (1 - self.min_factor) * (1 - progress) ** self.power
        return 1.0

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return warm * self._decay(step)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int,
                    warmup_steps: int = 0, gamma: float = 0.1, step_size: int = 30,
                    milestones: Sequence[int] = (), power: float = 1.0, min_lr_factor: float = 0.0,
                    patience: int = 2) -> tuple[Any, str]:
    """Build a schedule.

    Returns:
        ``(scheduler, interval)`` where interval is ``"step"`` (call ``scheduler.step()``
        after every optimizer step) or ``"epoch"`` (``scheduler.step(metric)`` after
        each evaluation; plateau only).

    Raises:
        UsageError: unknown name, or warm-up combined with plateau.
    """
    if name not in SCHEDULES:
        raise UsageError(f"Unknown scheduler {name!r}. Available: {list(SCHEDULES)}")
    if name == "plateau":
        if warmup_steps:
            raise UsageError("--warmup-steps cannot be combined with --scheduler plateau.",
                             "use cosine or poly with warm-up, or plateau without it.")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=gamma, patience=patience), "epoch"
    if name == "multistep" and not milestones:
        raise UsageError("--scheduler multistep needs --milestones, e.g. --milestones 30 60.")
    schedule = StepSchedule(name, steps_per_epoch, total_steps, warmup_steps, gamma, step_size,
                            list(milestones), power, min_lr_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "step"


OPTIMIZERS = ("sgd", "adam", "adamw")


def build_optimizer(name: str, params: Any, lr: float, momentum: float = 0.9,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW.

    Raises:
        UsageError: unknown name or a non-positive learning rate.
    """
    if lr <= 0:
        raise UsageError(f"--lr {lr}: expected a positive learning rate.")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UsageError(f"Unknown optimizer {name!r}. Available: {list(OPTIMIZERS)}")
