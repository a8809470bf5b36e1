"""``launch`` inside a SLURM allocation: one agent per node, started through ``srun``.

In the batch script (or an ``salloc`` shell) ``SLURM_JOB_ID`` is set but ``SLURM_PROCID``
is not: ``launch`` re-executes itself under ``srun`` with one task per node. Inside
that task (``SLURM_PROCID`` set) the node rank comes from ``SLURM_NODEID``, the master
is the first host of the nodelist and the port derives from the job id, so every
node computes the same values without talking to the others.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from trainfleet.slurm.nodelist import SlurmTask, slurm_task
from trainfleet.utils.errors import UsageError

PORT_BASE, PORT_SPAN = 20000, 20000


def job_port(job_id: str) -> int:
    """The rendezvous port of a job: the same on every node, different between jobs."""
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def allocation(env: Mapping[str, str]) -> tuple[str, SlurmTask] | None:
    """``("batch", task)`` in a batch script/salloc shell, ``("task", task)`` inside srun, else None."""
    task = slurm_task(env)
    if task is None:
        return None
    return ("task" if task.procid is not None else "batch"), task


def check_geometry(task: SlurmTask, nodes: int, env: Mapping[str, str]) -> None:
    """The allocation must match the request: one agent per node, as many nodes as asked.

    Raises:
        UsageError: what SLURM gave against what was requested.
    """
    hosts = ",".join(task.hosts) or "?"
    if task.nnodes != nodes:
        raise UsageError(f"SLURM gave {task.nnodes} node(s) ({hosts}) but --nodes {nodes} was requested.",
                         f"use --nodes {task.nnodes}, or allocate {nodes} nodes (sbatch --nodes {nodes}).")
    ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if task.procid is not None and ntasks and int(ntasks) != task.nnodes:
        raise UsageError(f"SLURM started {ntasks} tasks on {task.nnodes} node(s); trainfleet needs one agent "
                         "per node.", "run `launch` in the batch script itself (it starts srun), or "
                         "`srun --ntasks-per-node=1 launch ...`.")


def srun_command(task: SlurmTask, python: str, argv: Sequence[str]) -> list[str]:
    """The srun line that starts one ``launch`` agent on every node of the allocation."""
    n = task.nnodes
    return ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            python, "-m", "trainfleet.launcher.cli", "launch", *argv]
