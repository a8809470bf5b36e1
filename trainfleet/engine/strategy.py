"""The Strategy interface every parallel backend implements.

Public methods check state and arguments, then call ``_``-prefixed hooks that
subclasses override. Single-process strategies share :class:`SingleProcessStrategy`,
whose collectives are no-ops, so a world of one runs the same code path as N.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, ContextManager

import torch

from trainfleet.engine.checkpoint.training_state import load_optimizer_state_by_name, optimizer_state_by_name
from trainfleet.engine.environment import ClusterEnvironment, device_index, resolve_accelerator
from trainfleet.engine.precision import Precision, build_precision
from trainfleet.engine.registry import STRATEGIES
from trainfleet.utils.errors import UsageError

REDUCE_OPS = ("sum", "mean", "max", "min", "product")


class Strategy(ABC):
    """How modules are wrapped, where tensors live and how ranks talk.

    Args:
        precision: a :class:`Precision` or its registered name; fp32 when None.
        env: the rank layout; read from the environment when None.
        accelerator: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    name = "base"
    broadcasts_weights = False  # wrapping a module copies rank 0's weights to every rank (ddp, horovod)
    shards_checkpoints = False  # engine.save writes a DCP folder (True) or one file (False) by default

    def __init__(self, precision: Precision | str | None = None,
                 env: ClusterEnvironment | None = None, accelerator: str | None = None):
        self.precision = build_precision(precision)
        self.env = env if env is not None else ClusterEnvironment.from_env()
        self.accelerator = accelerator
        self._environment_ready = False
        self.timer: Any = None  # a profiling.StepTimer under `trainfleet bench`

    # ----- layout ------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    @abstractmethod
    def root_device(self) -> torch.device:
        """The device this process computes on."""

    @property
    @abstractmethod
    def is_global_zero(self) -> bool:
        """True on the one process that writes files and prints."""

    # ----- lifecycle ---------------------------------------------------------------
    def setup_environment(self) -> None:
        """Initialise devices and process groups once; later calls do nothing."""
        if not self._environment_ready:
            self._setup_environment()
            self._environment_ready = True
            self.precision.attach(self.root_device)

    def _setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)

    def teardown(self, failed: bool = False) -> None:
        """Release process groups and devices; safe to call twice. ``failed``: the script is
        ending on an error, so collectives may be left unfinished (NCCL aborts instead of waiting)."""
        if self._environment_ready:
            self._teardown(failed)
            self._environment_ready = False

    def _teardown(self, failed: bool = False) -> None:
        pass

    # ----- modules and optimizers ---------------------------------------------------
    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move ``module`` to the device, convert it for the precision and wrap it."""
        if not isinstance(module, torch.nn.Module):
            raise UsageError(f"setup expects a torch.nn.Module, got {type(module).__name__}.")
        self.setup_environment()
        module = self.precision.convert_module(module.to(self.root_device))
        wrapped = self._setup_module(module)
        self._share_masters()
        return wrapped

    def _share_masters(self) -> None:
        """O2 copies the fp32 masters from this rank's weights before the wrap broadcasts rank 0's:
        take rank 0's masters too, or the first step would put each rank's own start back."""
        masters = list(getattr(self.precision, "masters", {}).values())
        if not masters or not self.broadcasts_weights or self.world_size == 1:
            return
        flat = self.broadcast(torch.cat([m.reshape(-1) for m in masters]), 0)
        offset = 0
        for master in masters:
            master.copy_(flat[offset:offset + master.numel()].view_as(master))
            offset += master.numel()

    @abstractmethod
    def _setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Wrap a module already on the root device (DDP, DataParallel, ...)."""

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer this strategy cannot take, before the module is wrapped (default: any)."""

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Wrap the optimizer if the strategy needs to (Horovod does); default unchanged."""
        return optimizer

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The user's module inside any wrappers (DDP, DataParallel, torch.compile)."""
        while True:
            inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
            if not isinstance(inner, torch.nn.Module):
                return module
            module = inner

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass through the precision (loss scaling lives there)."""
        self.precision.backward(loss)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """One optimizer step through the precision; False if it was skipped."""
        return self.precision.optimizer_step(optimizer)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients (set to None: no memset, and the next backward allocates)."""
        optimizer.zero_grad(set_to_none=True)

    def discard_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients of an interrupted step (in-place recovery): they are not the step's."""
        self.zero_grad(optimizer)

    def no_backward_sync(self, module: torch.nn.Module) -> ContextManager[Any]:
        """Context in which backward does not synchronise gradients (accumulation)."""
        return contextlib.nullcontext()

    # ----- checkpoint state: whole (unsharded), on the CPU of global rank 0 ------------
    def full_model_state(self, module: torch.nn.Module) -> dict[str, Any]:
        """The unwrapped module's whole state_dict (a collective for sharded strategies)."""
        return module.state_dict()

    def full_optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's whole state keyed by parameter name (a collective for sharded strategies)."""
        return optimizer_state_by_name(optimizer, module)

    def load_full_model_state(self, module: torch.nn.Module, state: dict[str, Any]) -> None:
        """Load a whole (unsharded) state_dict whose keys were already checked."""
        module.load_state_dict(state, strict=False)

    def load_full_optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                  saved: dict[str, Any], path: str) -> None:
        """Load what :meth:`full_optimizer_state` returned (or a plain positional state_dict)."""
        load_optimizer_state_by_name(optimizer, module, saved, path)

    # ----- collectives --------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor | float, op: str = "mean") -> torch.Tensor:
        """Reduce ``tensor`` over all ranks; returns the result (a new tensor for numbers).

        Args:
            tensor: a tensor (reduced in place where the backend does so) or a number.
            op: one of ``sum``, ``mean``, ``max``, ``min``, ``product``.
        """
        if op not in REDUCE_OPS:
            raise UsageError(f"Unknown reduce op {op!r}. Available: {list(REDUCE_OPS)}")
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.tensor(tensor, dtype=torch.float64, device=self.root_device)
        if self.world_size == 1:
            return tensor
        return self._all_reduce(tensor, op)

    def barrier(self, name: str | None = None) -> None:
        """Block until every rank reaches this point."""
        if self.world_size > 1:
            self._barrier(name)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Send ``obj`` (a tensor or any picklable object) from ``src`` to all ranks."""
        if not 0 <= src < self.world_size:
            raise UsageError(f"broadcast src={src} is outside world size {self.world_size}.")
        if self.world_size == 1:
            return obj
        return self._broadcast(obj, src)

    def max_on_host(self, value: int) -> int:
        """The largest of every rank's ``value``, reduced in host memory: the GPU's queue is not
        waited for, so a per-step call (``should_stop``) costs no device sync."""
        if self.world_size == 1:
            return value
        return self._max_on_host(value)

    def _max_on_host(self, value: int) -> int:
        flag = torch.tensor([value], dtype=torch.int64)
        return int(self._all_reduce(flag, "max").item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        return self._all_gather_object(obj)

    @abstractmethod
    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor: ...

    @abstractmethod
    def _all_gather_object(self, obj: Any) -> list[Any]: ...

    @abstractmethod
    def _barrier(self, name: str | None) -> None: ...

    @abstractmethod
    def _broadcast(self, obj: Any, src: int) -> Any: ...


class MultiProcessStrategy(Strategy):
    """Base of one-process-per-device strategies (ddp, horovod): ``cuda:<local rank>`` or the CPU."""

    @property
    def root_device(self) -> torch.device:
        count = torch.cuda.device_count()
        if resolve_accelerator(self.accelerator, count) == "cpu":
            return torch.device("cpu")
        return torch.device("cuda", device_index(self.local_rank, self.env.local_world_size, count))

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0


class SingleProcessStrategy(Strategy):
    """Base of strategies that run one process: collectives are identities."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.env.world_size != 1:
            raise UsageError(
                f"strategy {self.name!r} runs one process but WORLD_SIZE={self.env.world_size}.",
                "use --strategy ddp for several workers, or launch dp with --gpus covering one process.",
            )

    @property
    def is_global_zero(self) -> bool:
        return True

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return tensor

    def _barrier(self, name: str | None) -> None:
        pass

    def _broadcast(self, obj: Any, src: int) -> Any:
        return obj

    def _all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]


def build_strategy(name: str | Strategy | None, **kwargs: Any) -> Strategy:
    """A strategy instance from a registered name, an instance, or None.

    None picks ``ddp`` when a launcher set RANK/WORLD_SIZE and ``single`` otherwise.
    """
    if isinstance(name, Strategy):
        return name
    if name is None:
        env = kwargs.get("env") or ClusterEnvironment.from_env()
        kwargs["env"] = env
        name = "ddp" if env.launched else "single"
    return STRATEGIES.get(name)(**kwargs)
