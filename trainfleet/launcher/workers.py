"""What the launcher decides about each worker: its spec (rank, target, log file) and its
environment (torchrun's variables plus trainfleet's, written through :mod:`trainfleet.contract`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from trainfleet.engine import contract
from trainfleet.launcher import horovod
from trainfleet.launcher.config import LaunchConfig, Placement, log_dir
from trainfleet.launcher.devices import visible_devices_for
from trainfleet.launcher.network import interface_for


@dataclass
class WorkerSpec:
    """Everything one worker needs; picklable for the spawn start method."""

    rank: int
    local_rank: int
    target: str
    args: list[str]
    module: bool
    env: dict[str, str]
    log_path: str
    error_file: str
    launcher_pid: int
    threads: int | None = None
    start_method: str = "fork"
    progress_file: str | None = None  # the rank's progress record (None: diagnosis off)
    recovery: str | None = None  # elastic ddp: the in-place recovery files' base (engine/recovery.py)


def worker_env(cfg: LaunchConfig, place: Placement, local_rank: int, port: int,
               horovod_port: int | None = None, attempt: int = 0) -> dict[str, str]:
    """The environment torchrun gives a worker, plus trainfleet's own (and Horovod's) settings."""
    procs = cfg.procs_per_node
    rank, world = place.index * procs + local_rank, place.nodes * procs
    env: dict[str, Any] = {
        "RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": world,
        "LOCAL_WORLD_SIZE": procs, "GROUP_RANK": place.index, "GROUP_WORLD_SIZE": place.nodes,
        "ROLE_RANK": rank, "ROLE_WORLD_SIZE": world, "ROLE_NAME": "default",
        "MASTER_ADDR": cfg.master_addr, "MASTER_PORT": port,
        "TORCHELASTIC_RUN_ID": cfg.run_id, "TORCHELASTIC_RESTART_COUNT": attempt,
        "TORCHELASTIC_MAX_RESTARTS": cfg.max_restarts,
        # Workers join the store node 0's agent hosts instead of rank 0 starting one.
        contract.AGENT_STORE: "True" if not cfg.debug else "False",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(contract.worker_variables(
        strategy=cfg.strategy, precision=cfg.precision, strategy_options=cfg.strategy_options,
        amp_backend=cfg.amp_backend, accelerator=cfg.accelerator, run_id=cfg.run_id, node=place.node,
        tty=sys.stdout.isatty(),  # workers write to files: does rank 0's echo land on a terminal?
        collective_timeout=cfg.collective_timeout,
        # an elastic job: the engine checks the global batch against every size the job may run at
        nodes_spec=cfg.nodes_spec if cfg.elastic else None, world_changed=place.changed,
        resume_record=str(log_dir(cfg) / f"resume.attempt{attempt}.json"),
        on_nan=cfg.on_nan, max_rollbacks=cfg.max_rollbacks))
    if cfg.collective_timeout and cfg.accelerator == "cuda" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        # NCCL's watchdog would abort the worker at the timeout (SIGABRT); a blocking wait
        # raises in the script instead, where the engine names the rank and the line.
        env["TORCH_NCCL_BLOCKING_WAIT"] = 1  # (torch then turns its asynchronous error handling off)
    elif cfg.accelerator == "cuda" and in_place_capable(cfg) and "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ:
        # torch's default (3) ends the process when the watchdog sees a peer's NCCL error: the survivors
        # of a lost node would die with it instead of going on in place. 2 aborts the communicator only,
        # and the failed collective raises in the script, where the engine recovers (engine/recovery.py).
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = 2
    if cfg.nodes > 1 or cfg.master_addr not in ("127.0.0.1", "localhost"):
        # gloo/NCCL otherwise pick the interface of the hostname, often 127.0.0.1.
        iface = interface_for(cfg.master_addr)
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if iface and name not in os.environ:
                env[name] = iface
    if cfg.accelerator == "cuda" and cfg.simulated_nodes:
        # Simulated nodes share this host's GPUs: node n takes its own slice, or ranks 0 and g of
        # different nodes would open the same device (NCCL: "Duplicate GPU detected").
        env["CUDA_VISIBLE_DEVICES"] = visible_devices_for(cfg.devices_per_node, start=place.node * cfg.devices_per_node)
    elif cfg.accelerator == "cuda" and cfg.procs_per_node == 1 and cfg.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices_for(cfg.devices_per_node)
    if horovod_port is not None:
        env.update(horovod.slot_env(cfg, place, local_rank, horovod_port))
    return {key: str(value) for key, value in env.items()}


def in_place_capable(cfg: LaunchConfig) -> bool:
    """Whether a lost node leaves the survivors' workers running (engine/recovery.py): elastic
    ddp, Horovod (shut down and initialised again in the same processes) and fsdp jobs (one shard
    per rank: each rank's shards are copied to the next node, engine/replicas.py; hybrid: another
    shard group holds them)."""
    return cfg.elastic and cfg.strategy in ("ddp", "horovod", "fsdp") and not cfg.debug


def threads_per_worker(procs: int) -> int:
    """CPU threads each worker may use so the workers do not oversubscribe the cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // procs)


def worker_specs(agent: Any, attempt: int, port: int, horovod_port: int | None) -> list[WorkerSpec]:
    """The workers of ``agent``'s node for one attempt (logs: LOG_DIR/node<N>/rank<R>.log)."""
    cfg, node, place = agent.cfg, agent.node_rank, agent.placement
    procs = cfg.procs_per_node
    threads = threads_per_worker(procs)
    folder = log_dir(cfg) / f"node{node}"
    suffix = f".attempt{attempt}" if attempt else ""
    specs = []
    for local_rank in range(procs):
        env = worker_env(cfg, place, local_rank, port, horovod_port, attempt)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        rank = int(env["RANK"])
        progress = None
        if cfg.hang_timeout != 0:
            progress = str(folder / f"rank{rank}{suffix}.progress")
            env[contract.PROGRESS_FILE] = progress
            if "TORCH_FR_BUFFER_SIZE" not in os.environ:  # torch's Flight Recorder: the collective a rank waits in
                env["TORCH_FR_BUFFER_SIZE"] = "2000"
        recovery = None
        if in_place_capable(cfg):  # named by local rank: the same process keeps it across attempts
            recovery = str(folder / f"local{local_rank}.recovery")
            env[contract.RECOVERY] = recovery
            if getattr(agent, "join_in_place", None) == attempt:  # this node joins the running workers
                env[contract.JOINING] = "1"
        specs.append(WorkerSpec(
            rank=rank, local_rank=local_rank, target=cfg.target, args=list(cfg.args), module=cfg.module,
            env=env, log_path=str(folder / f"rank{rank}{suffix}.log"),
            error_file=str(folder / f"rank{rank}{suffix}.error.json"), launcher_pid=os.getpid(), threads=threads,
            start_method=cfg.start_method, progress_file=progress, recovery=recovery))
    return specs
