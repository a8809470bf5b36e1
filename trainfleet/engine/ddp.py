"""DistributedDataParallel: one process per device, NCCL on CUDA, gloo on CPU."""
from __future__ import annotations

import datetime
import os
import time
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist

from trainfleet.engine.contract import AGENT_STORE, WorkerSettings
from trainfleet.engine.environment import backend_for
from trainfleet.engine.options import check_strategy_options
from trainfleet.engine.recovery import GroupSockets
from trainfleet.engine.strategy import MultiProcessStrategy

_OPS = {
    "sum": dist.ReduceOp.SUM,
    "mean": dist.ReduceOp.SUM,  # divided by the world size afterwards: gloo has no AVG
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}
# torch's own defaults: NCCL 10 minutes, gloo 30 (a NCCL job waited three times longer under trainfleet)
DEFAULT_TIMEOUT_S = {"nccl": 600.0, "gloo": 1800.0}
STORE_TRY_S = 1.0  # in-place recovery: how long one try to reach the store lasts (_connect_store)


def default_timeout_s(backend: str) -> float:
    """The collective timeout when neither ``timeout_s`` nor ``--collective-timeout`` says one."""
    return DEFAULT_TIMEOUT_S.get(backend, DEFAULT_TIMEOUT_S["gloo"])


def group_options(backend: str, device: torch.device, timeout_s: float) -> dict[str, Any]:
    """init_process_group's backend, timeout and, on NCCL, ``device_id``: the communicator is
    bound to this rank's GPU at once (eager init) instead of at the first collective, where
    NCCL would have to guess the device (and a barrier would pick the wrong one)."""
    options: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if backend == "nccl":
        options["device_id"] = device
    return options


def release_by(backend: str, failed: bool) -> str:
    """How to leave the default process group: ``abort`` after a failure on NCCL (destroying it
    would wait for collectives the failed rank's peers may never finish), else ``destroy``."""
    can_abort = hasattr(dist.distributed_c10d, "_abort_process_group")
    return "abort" if failed and backend == "nccl" and can_abort else "destroy"


def release_group(backend: str, failed: bool) -> None:
    if release_by(backend, failed) == "abort":
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


class DDPStrategy(MultiProcessStrategy):
    """Wraps the module in DDP and joins the process group from env:// variables.

    Args:
        timeout_s: collective timeout; ``launch --collective-timeout`` overrides torch's
            defaults (NCCL 10 minutes, gloo 30).
        sync_batchnorm: normalise with the statistics of the global batch (BatchNorm layers
            become ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` on CPU workers).
        **ddp_kwargs: passed to ``DistributedDataParallel`` (``find_unused_parameters``, ...).
    """

    name = "ddp"
    broadcasts_weights = True

    def __init__(self, precision: Any = None, env: Any = None, accelerator: str | None = None,
                 timeout_s: float | None = None, sync_batchnorm: bool = False, **ddp_kwargs: Any):
        check_strategy_options(self.name, ddp_kwargs)
        self.sync_batchnorm = bool(sync_batchnorm)
        self.synced_batchnorms = 0  # BatchNorm layers converted by setup
        super().__init__(precision, env, accelerator)
        self.timeout_s = float(timeout_s or WorkerSettings.from_env().collective_timeout
                               or default_timeout_s(self.backend))
        self.ddp_kwargs = ddp_kwargs
        self._owns_group = False
        self._host_group: Any = None  # gloo beside NCCL, for max_on_host
        self.sockets = GroupSockets()  # the default group's: its store's and its peers' (engine/recovery.py)
        # in-place recovery: whether a newer attempt than the one whose group is being made was decided
        # (its store may be gone: connecting to it would retry for the whole timeout)
        self.superseded: Callable[[], bool] | None = None

    @property
    def backend(self) -> str:
        return backend_for(self.root_device.type)

    def _setup_environment(self) -> None:
        super()._setup_environment()
        if dist.is_initialized():
            return
        # A plain `python train.py` (no launcher) is a world of one: an in-memory store, no port.
        where = {"init_method": "env://"} if self.env.launched else {"store": dist.HashStore()}
        with self.sockets.recording():
            if self.env.launched and self.superseded is not None and os.environ.get(AGENT_STORE) == "True":
                where = {"store": dist.PrefixStore("default_pg", self._connect_store())}  # as env:// would
            dist.init_process_group(rank=self.rank, world_size=self.world_size, **where,
                                    **group_options(self.backend, self.root_device, self.timeout_s))
        self._owns_group = True

    def _connect_store(self) -> Any:
        """The attempt's store on node 0's agent, as a client, tried a second at a time for the
        group's timeout: between tries, a newer attempt decided (the store this rank was told of is
        closed: a joining node went away before the group was made) fails it as a lost peer, so the
        in-place recovery takes the next answer."""
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                store = dist.TCPStore(addr, port, self.world_size, False,
                                      datetime.timedelta(seconds=max(0.1, min(STORE_TRY_S, left))))
                store.set_timeout(datetime.timedelta(seconds=self.timeout_s))
                return store
            except RuntimeError as err:
                if self.superseded is not None and self.superseded():
                    raise RuntimeError(f"rank {self.rank}: the store at {addr}:{port} is not there (Connection "
                                       "refused): a newer attempt was decided while this rank connected") from err
                if left <= 0:
                    raise

    def live_sockets(self) -> set[str]:
        return self.sockets.live()

    def _teardown(self, failed: bool = False) -> None:
        if self._owns_group and dist.is_initialized():
            release_group(self.backend, failed)
        self._owns_group, self._host_group = False, None

    def _convert_batchnorm(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.sync_batchnorm:
            return module
        from trainfleet.engine.syncbn import convert_batchnorm

        module, self.synced_batchnorms = convert_batchnorm(module, self.root_device.type)
        return module

    def _setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        module = self._convert_batchnorm(module)
        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **self.ddp_kwargs)
        if self.timer is not None:
            from trainfleet.engine.profiling import timed_allreduce_hook

            wrapped.register_comm_hook(None, timed_allreduce_hook(self.timer))
        return wrapped

    def abandon_group(self) -> None:
        """Leave a default group a peer of which is gone (in-place recovery): abort it first, so its
        connections close now and a survivor still waiting in a collective with this rank fails at
        once (gloo would otherwise wait out its timeout), then forget it."""
        if not dist.is_initialized():
            # a making that failed half-way named its group already: torch counts default group names up
            # from 0 and resets the count only when a group is destroyed, so a rank whose last making failed
            # later than its peers' would name the next group "1" and they "0", and wait in keys never set
            dist.distributed_c10d._world.group_count = 0
            return
        self.sockets.cut()
        group = dist.distributed_c10d._get_default_group()
        for device in ("cpu", "cuda"):
            try:
                backend = group._get_backend(torch.device(device))
            except RuntimeError:
                continue
            if hasattr(backend, "abort"):
                try:
                    backend.abort()
                except RuntimeError:
                    pass
        try:
            dist.destroy_process_group()
        except RuntimeError:
            pass
        self._owns_group, self._host_group, self._environment_ready = False, None, False

    def wrap_again(self, module: torch.nn.Module) -> torch.nn.Module:
        """A new DDP around an already set-up module, over the current default group (in-place
        recovery rebuilds the script's DDP object with it: engine/recovery.py)."""
        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **self.ddp_kwargs)

    def no_backward_sync(self, module: torch.nn.Module) -> ContextManager[Any]:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            return module.no_sync()
        return super().no_backward_sync(module)

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        self.setup_environment()
        work = tensor.to(self.root_device)  # the same tensor (reduced in place) when already there
        dist.all_reduce(work, op=_OPS[op])
        if op == "mean":
            work = work.div_(self.world_size) if work.is_floating_point() else work / self.world_size
        return work.to(tensor.device)

    def _max_on_host(self, value: int) -> int:
        """On NCCL over a gloo group of CPU tensors (made at the first call, which every rank makes
        at the same step), so the flag does not wait behind the step's kernels."""
        self.setup_environment()
        if self.backend == "nccl" and self._host_group is None:
            self._host_group = dist.new_group(backend="gloo")
        flag = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._host_group)
        return int(flag.item())

    def _barrier(self, name: str | None) -> None:
        self.setup_environment()
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    def _all_gather_object(self, obj: Any) -> list[Any]:
        self.setup_environment()
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def _broadcast(self, obj: Any, src: int) -> Any:
        self.setup_environment()
        if isinstance(obj, torch.Tensor):
            on_device = obj.to(self.root_device)
            dist.broadcast(on_device, src=src)
            return on_device.to(obj.device)
        payload = [obj if self.rank == src else None]
        dist.broadcast_object_list(payload, src=src, device=self.root_device)
        return payload[0]
