"""What the SLURM cluster offers, checked before a job is submitted.

sbatch would refuse a wrong partition or an impossible geometry too, but only after a
round trip and with a message about "node configuration"; these checks name the flag.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from trainfleet.slurm.resources import ClusterResources
from trainfleet.utils.errors import UsageError


@dataclass(frozen=True)
class Partition:
    """A partition as ``sinfo`` reports it (the largest node for per-node limits)."""

    name: str
    default: bool
    nodes: int
    cpus_per_node: int
    gpus_per_node: int
    mem_mb_per_node: int | None


def require_sbatch() -> None:
    """Raises UsageError when SLURM's client tools are not on PATH."""
    missing = [tool for tool in ("sbatch", "sinfo", "sacct") if not shutil.which(tool)]
    if missing:
        raise UsageError(f"--cluster slurm needs {', '.join(missing)} on PATH, but "
                         f"{'it was' if len(missing) == 1 else 'they were'} not found.",
                         "run on a SLURM login node, or use --cluster local to run here.")


def _gpus(gres: str) -> int:
    """GPUs in a GRES string such as ``gpu:a100:4(S:0-1),shard:8``."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"gpu(?::[^:(]+)?:(\d+)", item)
        if match:
            total += int(match.group(1))
    return total


def partitions() -> dict[str, Partition]:
    """Every partition of the cluster, from one ``sinfo`` call."""
    out = subprocess.run(["sinfo", "-h", "-e", "-o", "%P|%D|%c|%G|%m"], capture_output=True, text=True,
                         timeout=30)
    if out.returncode != 0:
        raise UsageError(f"sinfo failed: {(out.stderr.strip().splitlines() or [out.returncode])[-1]}.",
                         "is slurmctld reachable (SLURM_CONF)? Try `sinfo`.")
    found: dict[str, Partition] = {}
    for line in out.stdout.splitlines():
        name, nodes, cpus, gres, mem = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        part = Partition(name, default, int(nodes), int(cpus.rstrip("+")), _gpus(gres),
                         int(mem.rstrip("+")) if mem.rstrip("+").isdigit() else None)
        old = found.get(name)
        if old is not None:  # one line per node configuration: sum nodes, keep the largest node
            part = Partition(name, default or old.default, old.nodes + part.nodes,
                             max(old.cpus_per_node, part.cpus_per_node), max(old.gpus_per_node, part.gpus_per_node),
                             max(old.mem_mb_per_node or 0, part.mem_mb_per_node or 0) or None)
        found[name] = part
    return found


def check_request(res: ClusterResources) -> Partition:
    """The partition the job goes to, after checking the request fits it.

    Raises:
        UsageError: an unknown partition (with the known ones), or more nodes, CPUs,
            GPUs or memory per node than the partition has.
    """
    known = partitions()
    if res.partition:
        part = known.get(res.partition)
        if part is None:
            raise UsageError(f"--partition {res.partition}: no such partition on this cluster. "
                             f"Available: {sorted(known)}")
    else:
        part = next((p for p in known.values() if p.default), None)
        if part is None:
            raise UsageError("the cluster has no default partition.", f"pick one with --partition: {sorted(known)}.")
    where = f"partition {part.name!r}"
    if res.nodes > part.nodes:
        raise UsageError(f"--nodes {res.nodes} but {where} has {part.nodes} node(s).",
                         f"use --nodes {part.nodes} or fewer, or another partition.")
    if res.cpus > part.cpus_per_node:
        flag = f"--cpus-per-task {res.cpus_per_task}" if res.cpus_per_task else f"--gpus {res.workers} (1 CPU each)"
        raise UsageError(f"{flag} needs {res.cpus} CPUs per node but {where} has {part.cpus_per_node}.",
                         f"ask for at most {part.cpus_per_node} CPUs per node.")
    if res.gpus > part.gpus_per_node:
        raise UsageError(f"--gpus {res.gpus} per node but {where} has {part.gpus_per_node} GPUs per node.",
                         f"use --gpus {part.gpus_per_node}, a GPU partition, or --cpu for CPU workers."
                         if part.gpus_per_node else "use a GPU partition, or --cpu to run CPU workers.")
    if res.mem_gb is not None and part.mem_mb_per_node and res.mem_gb * 1024 > part.mem_mb_per_node:
        raise UsageError(f"--mem-gb {res.mem_gb} but {where} nodes have {part.mem_mb_per_node} MB.",
                         "ask for less memory, or omit --mem-gb for the partition's default.")
    return part
