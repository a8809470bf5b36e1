"""Horovod: ring all-reduce through ``hvd.DistributedOptimizer``, gloo or NCCL underneath.

Workers are started by trainfleet's own launcher, which provides what ``horovodrun
--gloo`` would (rendezvous server, HOROVOD_RANK/SIZE/LOCAL_*/CROSS_*). Horovod is
imported only when this strategy is selected.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from trainfleet.engine.contract import import_horovod
from trainfleet.engine.recovery import GroupSockets
from trainfleet.engine.strategy import MultiProcessStrategy
from trainfleet.utils.errors import UsageError


def check_build(hvd: Any, device_type: str) -> None:
    """Refuse CUDA training on a Horovod built without GPU support (the default build): its
    first broadcast of a CUDA tensor would fail deep inside with "not compiled with CUDA".

    Raises:
        UsageError: ``device_type`` is cuda and Horovod has neither CUDA nor NCCL built in.
    """
    if device_type == "cuda" and not (hvd.cuda_built() or hvd.nccl_built()):
        raise UsageError("strategy 'horovod' on GPUs, but this Horovod was built for CPU only (no CUDA, no NCCL).",
                         "rebuild it with TRAINFLEET_HOROVOD_GPU=1 scripts/build-horovod.sh (needs the CUDA "
                         "toolkit and NCCL), or run CPU workers with --cpu.")


class HorovodStrategy(MultiProcessStrategy):
    """Data parallel training through Horovod.

    Args:
        backward_passes_per_step: gradients are all-reduced once every this many
            backward passes (gradient accumulation; step after the last of them).
        compression: ``"none"`` or ``"fp16"`` (all-reduce gradients in fp16).
    """

    name = "horovod"
    broadcasts_weights = True

    def __init__(self, precision: Any = None, env: Any = None, accelerator: str | None = None,
                 backward_passes_per_step: int = 1, compression: str = "none"):
        super().__init__(precision, env, accelerator)
        self.hvd = import_horovod()
        if compression not in ("none", "fp16"):
            raise UsageError(f"Unknown Horovod compression {compression!r}. Available: ['fp16', 'none']")
        self.backward_passes_per_step = backward_passes_per_step
        self.compression = compression
        self._module: torch.nn.Module | None = None
        self.joining = False  # set by the engine on a rank that joins a running job in place
        self.sockets = GroupSockets()  # Horovod's gloo sockets (in-place recovery cuts them)

    # ----- layout: Horovod's own view once initialised -------------------------------
    @property
    def world_size(self) -> int:
        return self.hvd.size() if self._environment_ready else self.env.world_size

    @property
    def rank(self) -> int:
        return self.hvd.rank() if self._environment_ready else self.env.rank

    @property
    def local_rank(self) -> int:
        return self.hvd.local_rank() if self._environment_ready else self.env.local_rank

    def _setup_environment(self) -> None:
        check_build(self.hvd, self.root_device.type)
        with self.sockets.recording():
            self.hvd.init()  # (again after abandon_group: Horovod reads its HOROVOD_* variables anew)
        if self.hvd.size() != self.env.world_size and self.env.launched:
            raise UsageError(f"Horovod sees {self.hvd.size()} workers but WORLD_SIZE={self.env.world_size}.",
                             "start horovod jobs with `launch --strategy horovod`.")
        super()._setup_environment()

    def _teardown(self, failed: bool = False) -> None:
        self.hvd.shutdown()

    # ----- in-place recovery (engine/recovery.py): Horovod shut down and initialised again ----
    def live_sockets(self) -> set[str]:
        return self.sockets.live()

    def abandon_group(self) -> None:
        """Leave a ring a peer of which is gone: cut its connections (a survivor still waiting on
        this rank fails at once), shut Horovod down (its background loop has stopped on the error,
        or stops now), so ``hvd.init()`` with the new place's HOROVOD_* variables starts a new ring
        in this process (Horovod's own elastic mode resets the same way); the interrupted step's
        pending all-reduces are dropped when its gradients are (:meth:`discard_gradients`)."""
        if not self._environment_ready:
            return
        self.sockets.cut()
        try:
            self.hvd.shutdown()
        except Exception:  # noqa: BLE001 - a ring that failed may fail its shutdown too: it is gone either way
            pass
        self._environment_ready = False

    def discard_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        forget_pending(optimizer)  # (Horovod's zero_grad refuses while an all-reduce is pending)
        self.zero_grad(optimizer)

    # ----- modules and optimizers -----------------------------------------------------
    def _setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.joining:  # a rank joining in place gets the whole state from its peers (Engine._agree_state)
            self.hvd.broadcast_parameters(module.state_dict(), root_rank=0)
        self._module = module
        return module

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Broadcast the optimizer state from rank 0 and wrap it in ``hvd.DistributedOptimizer``."""
        if self._module is None:
            raise UsageError("set the model up before the optimizer: engine.setup(model, optimizer).")
        if not self.joining:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        compression = self.hvd.Compression.fp16 if self.compression == "fp16" else self.hvd.Compression.none
        return self.hvd.DistributedOptimizer(
            optimizer, named_parameters=self._module.named_parameters(), compression=compression,
            backward_passes_per_step=self.backward_passes_per_step, op=self.hvd.Average)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Wait for the gradient all-reduces, then step through the precision.

        Loss scalers must see the reduced gradients (Horovod's documented AMP pattern:
        ``synchronize``, unscale, step under ``skip_synchronize``).
        """
        if not hasattr(optimizer, "synchronize"):
            return super().optimizer_step(optimizer)
        if self.timer is not None:
            with self.timer.phase("comm"):
                optimizer.synchronize()
        else:
            optimizer.synchronize()
        with optimizer.skip_synchronize():
            return self.precision.optimizer_step(optimizer)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        # hvd.DistributedOptimizer.zero_grad takes no set_to_none; torch's default is True.
        optimizer.zero_grad()

    def no_backward_sync(self, module: torch.nn.Module) -> ContextManager[Any]:
        # Horovod delays the all-reduce by itself: backward_passes_per_step.
        return contextlib.nullcontext()

    # ----- collectives ----------------------------------------------------------------
    # Each is named: Horovod matches a collective across ranks by its name, and an unnamed one is
    # numbered by a per-process count (the same on every rank only while all made the same calls
    # since init), and broadcast_object names it by the object's type (the root's state, the others'
    # None). A rank joining in place meets the survivors in the middle of their history.
    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        self.setup_environment()
        ops = {"sum": self.hvd.Sum, "mean": self.hvd.Average, "max": self.hvd.Max, "min": self.hvd.Min,
               "product": self.hvd.Product}
        work = tensor if tensor.is_floating_point() or op != "mean" else tensor.double()
        result = self.hvd.allreduce(work.to(self.root_device), op=ops[op], name=f"trainfleet.all_reduce.{op}")
        if result.data_ptr() != tensor.data_ptr() and result.dtype == tensor.dtype and result.device == tensor.device:
            tensor.copy_(result)
            return tensor
        return result.to(tensor.device)

    def _max_on_host(self, value: int) -> int:
        self.setup_environment()  # a CPU tensor takes Horovod's CPU path (gloo/MPI), beside the GPU's
        return int(self.hvd.allreduce(torch.tensor([value], dtype=torch.int64), op=self.hvd.Max,
                                      name="trainfleet.max_on_host").item())

    def _barrier(self, name: str | None) -> None:
        self.setup_environment()
        self.hvd.barrier()

    def _broadcast(self, obj: Any, src: int) -> Any:
        self.setup_environment()
        if isinstance(obj, torch.Tensor):
            sent = self.hvd.broadcast(obj.to(self.root_device), root_rank=src, name="trainfleet.broadcast")
            return sent.to(obj.device)
        return self.hvd.broadcast_object(obj, root_rank=src, name="trainfleet.broadcast_object")

    def _all_gather_object(self, obj: Any) -> list[Any]:
        self.setup_environment()
        return self.hvd.allgather_object(obj, name="trainfleet.all_gather_object")


def forget_pending(optimizer: Any) -> None:
    """A ``hvd.DistributedOptimizer`` after a failed step: no all-reduce pending, every
    parameter's accumulation count full again (its next backward starts a step afresh)."""
    handles = getattr(optimizer, "_handles", None)
    if handles is None:
        return
    handles.clear()
    passes = optimizer.backward_passes_per_step
    for param in optimizer._allreduce_delay:
        optimizer._allreduce_delay[param] = passes
    for group in getattr(optimizer, "_group_counts", {}) or {}:
        optimizer._group_counts[group] = 0
    optimizer._synchronized, optimizer._should_synchronize = False, True
