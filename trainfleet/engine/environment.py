"""Where this process sits in the job: ranks and world size from the environment.

The variables are the ones torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT), so a worker started by
``launch``, by torchrun or by hand all look the same. Device and backend choice
live here too, as pure functions, so the CUDA/NCCL paths are testable on a CPU box.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from trainfleet.engine.contract import ElasticSettings
from trainfleet.utils.errors import UsageError

ACCELERATORS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ClusterEnvironment:
    """Rank layout of the current process.

    Attributes:
        rank: global rank.
        local_rank: rank within this node.
        world_size: number of processes in the job.
        local_world_size: processes on this node.
        node_rank: index of this node (torchrun's GROUP_RANK).
        launched: True when a launcher (trainfleet, torchrun) set RANK/WORLD_SIZE.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    launched: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ClusterEnvironment":
        """Read the torchrun-style variables; absent ones mean a plain single process."""
        env = os.environ if env is None else env
        launched = "RANK" in env and "WORLD_SIZE" in env

        def read(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise UsageError(f"{name}={raw!r} is not an integer.") from None

        world = read("WORLD_SIZE", 1)
        rank = read("RANK", 0)
        local_world = read("LOCAL_WORLD_SIZE", world if launched else 1)
        result = cls(
            rank=rank,
            local_rank=read("LOCAL_RANK", 0),
            world_size=world,
            local_world_size=local_world,
            node_rank=read("GROUP_RANK", read("NODE_RANK", 0)),
            launched=launched,
        )
        result.validate()
        return result

    def validate(self) -> None:
        """Raise a UsageError for an impossible layout (rank outside the world, ...)."""
        if self.world_size < 1:
            raise UsageError(f"WORLD_SIZE={self.world_size} must be at least 1.")
        if not 0 <= self.rank < self.world_size:
            raise UsageError(f"RANK={self.rank} is outside WORLD_SIZE={self.world_size}.")
        if not 0 <= self.local_rank < max(self.local_world_size, 1):
            raise UsageError(
                f"LOCAL_RANK={self.local_rank} is outside LOCAL_WORLD_SIZE={self.local_world_size}."
            )


def resolve_accelerator(requested: str | None, cuda_count: int) -> str:
    """Pick ``"cuda"`` or ``"cpu"``.

    Args:
        requested: ``"auto"``/None, ``"cpu"`` or ``"cuda"`` (what the launcher chose).
        cuda_count: CUDA devices visible to this process.

    Raises:
        UsageError: ``cuda`` was asked for on a machine without CUDA devices.
    """
    requested = (requested or "auto").lower()
    if requested not in ACCELERATORS:
        raise UsageError(f"Unknown accelerator {requested!r}. Available: {list(ACCELERATORS)}")
    if requested == "cuda" and cuda_count == 0:
        raise UsageError("accelerator 'cuda' was requested but no CUDA device is visible.",
                         "use --cpu, or check CUDA_VISIBLE_DEVICES and the driver.")
    if requested == "auto":
        return "cuda" if cuda_count > 0 else "cpu"
    return requested


def device_index(local_rank: int, local_world_size: int, cuda_count: int) -> int:
    """CUDA device of a worker: one device per local rank, like torchrun's convention.

    Raises:
        UsageError: more local workers than visible devices.
    """
    if local_world_size > cuda_count:
        raise UsageError(
            f"{local_world_size} workers on this node but only {cuda_count} CUDA devices are visible.",
            f"use --gpus {cuda_count}, or --cpu to run CPU workers.",
        )
    return local_rank


def backend_for(device_type: str) -> str:
    """The collective backend for a device type: NCCL on CUDA, gloo everywhere else."""
    return "nccl" if device_type == "cuda" else "gloo"


@dataclass(frozen=True)
class ElasticInfo:
    """What ``launch --nodes MIN:MAX`` tells each worker of an elastic job.

    Attributes:
        low, high: the node range. per_node: workers per node.
        world_changed: this attempt runs on other nodes than the one before.
        record: where rank 0 notes what it resumed from, for the launcher's report.
    """

    low: int
    high: int
    per_node: int
    world_changed: bool = False
    record: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ElasticInfo | None":
        env = os.environ if env is None else env
        told = ElasticSettings.from_env(env)
        if ":" not in told.nodes:
            return None
        low, high = (int(part) for part in told.nodes.split(":"))
        return cls(low, high, int(env.get("LOCAL_WORLD_SIZE", "1")), told.world_changed, told.resume_record)

    @property
    def world_sizes(self) -> list[int]:
        """Every world size the job may run at, smallest first."""
        return [nodes * self.per_node for nodes in range(self.low, self.high + 1)]


def data_step(dataloader: Any) -> int | None:
    """The global step a training loader's position stands at (None: not one of the engine's)."""
    if dataloader is None or not hasattr(dataloader, "sampler"):
        return None
    state = dataloader.state_dict()
    return state["epoch"] * dataloader.sampler.global_batches() + state["consumed"] // state["global_batch_size"]


def note_resume(record: str, path: object, dataloader: object, in_place: int | None = None) -> None:
    """Write what rank 0 resumed from (or that it started fresh, or went on in place from a step
    held in memory) for the launcher's report, atomically: the launcher reads it while the job runs."""
    state = dataloader.state_dict() if dataloader is not None else None
    step = data_step(dataloader)  # the report counts the steps computed again from it
    tmp = f"{record}.tmp"
    with open(tmp, "w") as handle:
        json.dump({"path": str(path) if path is not None else None, "data": state, "in_place": in_place,
                   "step": in_place if in_place is not None else step}, handle)
    os.replace(tmp, record)
