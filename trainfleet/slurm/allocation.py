"""``launch`` inside a SLURM allocation: one agent per node, started through ``srun``.

In the batch script (or an ``salloc`` shell) ``SLURM_JOB_ID`` is set but ``SLURM_STEP_ID``
is not (the batch script does have SLURM_PROCID=0): ``launch`` re-executes itself under
``srun`` with one task per node. Inside that task (``SLURM_STEP_ID`` set) the node rank comes from ``SLURM_NODEID``, the master
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


def srun_command(task: SlurmTask, python: str, argv: Sequence[str], elastic: bool = False) -> list[str]:
    """The srun line that starts one ``launch`` agent on every node of the allocation. An elastic
    job's step goes on when one node's agent dies (the survivors continue without it)."""
    n = task.nnodes
    return ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1",
            f"--kill-on-bad-exit={0 if elastic else 1}", python, "-m", "trainfleet.launcher.cli", "launch", *argv]


def run_srun(task: SlurmTask, python: str, argv: Sequence[str], elastic: bool) -> int:
    """Run the step from the batch script. srun exits with the worst task's status; an elastic
    job's result is node 0's (a node lost on the way is not a failure), which its agent writes
    to TRAINFLEET_EXIT_FILE. Node 0's task runs on this, the batch, host."""
    import os
    import subprocess
    import tempfile

    if not elastic:
        return subprocess.call(srun_command(task, python, argv))
    handle, path = tempfile.mkstemp(prefix="trainfleet-exit-")
    os.close(handle)
    try:
        code = subprocess.call(srun_command(task, python, argv, elastic=True),
                               env={**os.environ, "TRAINFLEET_EXIT_FILE": path})
        text = open(path).read().strip()
        return int(text) if text else code
    finally:
        os.unlink(path)
