"""The training state of the last completed step, held in host memory.

After every optimizer step the engine keeps what the next iteration may change before its own
optimizer step: the model's buffers (BatchNorm's running statistics change in the forward), the
loss scaler, every RNG and the loaders' positions. The buffers are copied into host tensors
allocated once (a copy, not a serialisation; new ones only when a shape or dtype changes). The
parameters and the optimizer's state are not copied: both readers below act before the
iteration's optimizer step, so the live ones still hold the last step's values (copying them
cost 14% of a 22 ms step, Adam on 2.2 M parameters: docs/measurements/elastic-recovery.txt at
5438900). :meth:`StateSnapshot.whole` adds them, live, when a peer needs them. What reads it:

- ``--on-nan rollback`` (:class:`Rollback`): a non-finite loss on any rank returns every rank to
  this state and drops the batch, so the run equals one that never saw that batch;
- the data position is kept beside it (``loaders``), for what restarts from it.

A snapshot is either the complete state of its step or absent: :meth:`StateSnapshot.capture`
fills the buffers and only then records the step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from trainfleet.utils.errors import UsageError

ON_NAN_CHOICES = ("report", "rollback")


def _copy_into(held: Any, live: Any) -> Any:
    """``live`` copied into ``held``'s tensors where shapes and dtypes match (new ones otherwise);
    containers are rebuilt, other values kept as they are (numbers, strings: immutable)."""
    if isinstance(live, torch.Tensor):
        if (isinstance(held, torch.Tensor) and held.shape == live.shape and held.dtype == live.dtype
                and type(held) is type(live)):
            held.copy_(live.detach())
            return held
        copy = live.detach().to("cpu", copy=True)
        return copy.pin_memory() if live.device.type == "cuda" and torch.cuda.is_available() else copy
    if isinstance(live, dict):
        old = held if isinstance(held, dict) else {}
        return {key: _copy_into(old.get(key), value) for key, value in live.items()}
    if isinstance(live, (list, tuple)):
        old = held if isinstance(held, (list, tuple)) and len(held) == len(live) else [None] * len(live)
        return type(live)(_copy_into(h, v) for h, v in zip(old, live))
    return live


def _fresh(held: Any) -> Any:
    """A copy of ``held`` that loading may keep (``Optimizer.load_state_dict`` keeps the tensors
    it is given when device and dtype already match: the live state must not alias the buffers)."""
    if isinstance(held, torch.Tensor):
        return held.clone()
    if isinstance(held, dict):
        return {key: _fresh(value) for key, value in held.items()}
    if isinstance(held, (list, tuple)):
        return type(held)(_fresh(value) for value in held)
    return held


@dataclass
class StateSnapshot:
    """One rank's state after step ``step`` (None: nothing captured yet)."""

    step: int | None = None
    model: Any = None
    optimizer: Any = None
    precision: Any = None
    rng: Any = None
    loaders: list = field(default_factory=list)
    seconds: float = 0.0  # the last capture's time
    scheduler: Any = None  # only in a whole snapshot (for a joining rank): the script's scheduler's state
    counters: Any = None  # ... and the sender's progress counters (ProgressBoard.counters: the save's signature)

    def capture(self, step: int, model: torch.nn.Module, optimizer: Any, precision: Any, rng: dict,
                loaders: list) -> None:
        """The state after step ``step``: the buffers copied, the rest as values (see the module)."""
        began = time.perf_counter()
        self.step = None  # incomplete until the end
        held = self.model if isinstance(self.model, dict) and not self.optimizer else None
        self.model = _copy_into(held, {name: b for name, b in model.named_buffers() if b is not None})
        self.optimizer = None
        self.precision = precision.state_dict()
        self.rng = rng
        self.loaders = [loader.state_dict() for loader in loaders]
        self.step = step
        self.seconds = time.perf_counter() - began

    def whole(self, model: torch.nn.Module, optimizer: Any, scheduler: Any = None) -> "StateSnapshot":
        """This snapshot with the live parameters and optimizer state (what a rank one step behind,
        or a joining one, takes from a peer that completed the step), as a new snapshot to send;
        with the scheduler's state when the engine knows the script's scheduler."""
        state = {**model.state_dict(), **(self.model or {})}
        return StateSnapshot(self.step, {k: v.detach().cpu() for k, v in state.items()},
                             optimizer.state_dict() if optimizer is not None else None, self.precision, self.rng,
                             list(self.loaders), scheduler=scheduler.state_dict() if scheduler is not None else None)

    def restore(self, model: torch.nn.Module, optimizer: Any, precision: Any, restore_rng: Any,
                loaders: list | None = None) -> None:
        """Put the captured state back (the loaders' positions too when ``loaders`` is given)."""
        if self.step is None:
            raise RuntimeError("no snapshot to restore")
        with torch.no_grad():
            if self.optimizer is not None:  # a whole state, from a peer
                model.load_state_dict(self.model)  # copied into the live tensors
            else:
                buffers = dict(model.named_buffers())
                for name, held in (self.model or {}).items():
                    buffers[name].copy_(held)
        if optimizer is not None and self.optimizer is not None:
            optimizer.load_state_dict(_fresh(self.optimizer))
        precision.load_state_dict(self.precision)
        restore_rng(self.rng)
        for loader, state in zip(loaders or [], self.loaders):
            loader.load_state_dict(state)

    def nbytes(self) -> int:
        """Host memory the snapshot holds."""
        total = 0

        def walk(value: Any) -> None:
            nonlocal total
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):
                for item in value.values():
                    walk(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    walk(item)

        walk((self.model, self.optimizer))
        return total


class NonFiniteLossError(RuntimeError):
    """A non-finite loss after ``--max-rollbacks`` rollbacks."""


@dataclass
class Rollback:
    """``--on-nan rollback``: the engine's side (see the module's docstring).

    Args:
        limit: rollbacks allowed (``--max-rollbacks``); the next non-finite loss fails the rank.
    """

    limit: int
    done: int = 0
    pending: list | None = None  # ranks whose loss was not finite in the step being computed
    history: list = field(default_factory=list)  # (step, ranks) of each rollback

    @classmethod
    def from_setting(cls, on_nan: str | None, max_rollbacks: int | None) -> "Rollback | None":
        if on_nan in (None, "", "report"):
            return None
        if on_nan != "rollback":
            raise UsageError(f"on_nan={on_nan!r}: expected one of {', '.join(ON_NAN_CHOICES)}.",
                             "'rollback' returns every rank to the last step on a non-finite loss.")
        limit = 3 if max_rollbacks is None else int(max_rollbacks)
        if limit < 0:
            raise UsageError(f"max_rollbacks={limit}: expected a count >= 0.")
        return cls(limit)
