"""``launch`` inside a SLURM allocation: one agent per node, started through ``srun``.

In the batch script (or an ``salloc`` shell) ``SLURM_JOB_ID`` is set but ``SLURM_STEP_ID``
is not (the batch script does have SLURM_PROCID=0): ``launch`` re-executes itself under
``srun`` with one task per node. Inside that task (``SLURM_STEP_ID`` set) the node rank comes from ``SLURM_NODEID``, the master
is the first host of the nodelist and the port derives from the job id, so every
node computes the same values without talking to the others.
"""
from __future__ import annotations

from dataclasses import dataclass
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
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    return ("task" if in_step else "batch"), task


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
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if in_step and ntasks and int(ntasks) != task.nnodes:
        raise UsageError(f"SLURM started {ntasks} tasks on {task.nnodes} node(s); trainfleet needs one agent "
                         "per node.", "run `launch` in the batch script itself (it starts srun), or "
                         "`srun --ntasks-per-node=1 launch ...`.")


def node_address(name: str) -> str:
    """An address for a SLURM node name: the name if it resolves, else the NodeAddr that
    ``scontrol show node`` reports (clusters whose node names are not in DNS)."""
    import shutil
    import socket
    import subprocess

    try:
        socket.gethostbyname(name)
        return name
    except OSError:
        pass
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "node", name, "-o"], capture_output=True, text=True).stdout
        for field in out.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
    return name


@dataclass
class Step:
    """What ``launch`` does inside an allocation: start the step (``srun``), or run as one node."""

    task: SlurmTask
    nodes: int  # the job's size: an elastic job runs at the allocation's size
    srun: bool  # in the batch shell: start one agent per node through srun
    elastic: bool = False
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None


def plan_in_allocation(nodes: tuple[int, int], master_addr: str, master_port: int | None, env: Mapping[str, str],
                       explicit_master: bool = False) -> Step | None:
    """Where ``launch --nodes MIN:MAX`` runs inside a SLURM allocation; None outside one (or in a
    one-node batch script, which runs right there).

    Args:
        explicit_master: the user chose ``master_addr`` (else the allocation's first node is).

    Raises:
        UsageError: the allocation does not match the request (see :func:`check_geometry`).
    """
    found = allocation(env)
    if found is None:
        return None
    where, task = found
    low, high = nodes
    if where == "batch" and task.nnodes == 1 and high == 1:
        return None
    if low <= task.nnodes < high:  # an elastic job on an allocation of MIN..MAX nodes
        high = task.nnodes
    check_geometry(task, high, env)
    if where == "batch":
        return Step(task, high, srun=True, elastic=low < high)
    if master_addr in ("127.0.0.1", "localhost") and not explicit_master:
        master_addr = node_address(task.master_addr)
    return Step(task, high, srun=False, elastic=low < high, node_rank=task.node_rank, master_addr=master_addr,
                master_port=master_port or job_port(task.job_id))


def srun_command(task: SlurmTask, launch: Sequence[str], argv: Sequence[str], elastic: bool = False) -> list[str]:
    """The srun line that starts one ``launch`` agent on every node of the allocation. An elastic
    job's step goes on when one node's agent dies (the survivors continue without it).

    Args:
        launch: the command that runs ``launch`` (``python -m trainfleet.cli launch``), given by
            the CLI: slurm never names it.
    """
    n = task.nnodes
    return ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1",
            f"--kill-on-bad-exit={0 if elastic else 1}", *launch, *argv]


def run_srun(task: SlurmTask, launch: Sequence[str], argv: Sequence[str], elastic: bool,
             exit_file_variable: str) -> int:
    """Run the step from the batch script. srun exits with the worst task's status; an elastic
    job's result is node 0's (a node lost on the way is not a failure), which its agent writes
    to the file named in ``exit_file_variable``. Node 0's task runs on this, the batch, host."""
    import os
    import subprocess
    import tempfile

    if not elastic:
        return subprocess.call(srun_command(task, launch, argv))
    handle, path = tempfile.mkstemp(prefix="trainfleet-exit-")
    os.close(handle)
    try:
        code = subprocess.call(srun_command(task, launch, argv, elastic=True),
                               env={**os.environ, exit_file_variable: path})
        text = open(path).read().strip()
        return int(text) if text else code
    finally:
        os.unlink(path)
