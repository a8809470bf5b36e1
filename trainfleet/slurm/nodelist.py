"""SLURM hostlist expressions and the SLURM environment of a task.

``expand_nodelist("gpu[01-03,7],login1")`` gives what ``scontrol show hostnames``
prints, without a subprocess, for code that runs where ``scontrol`` is absent.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from trainfleet.utils.errors import UsageError


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise UsageError(f"unbalanced brackets in SLURM nodelist {text!r}.")
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_range(body: str, nodelist: str) -> list[str]:
    values = []
    for item in body.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise UsageError(f"bad range {item!r} in SLURM nodelist {nodelist!r}.")
        width = len(low)
        for number in range(int(low), int(high or low) + 1):
            values.append(str(number).zfill(width))
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM hostlist expression, in order (``a[1-2]b`` -> ``a1b, a2b``)."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        expansions = [""]
        rest = part
        while rest:
            match = re.match(r"([^\[]*)\[([^\]]*)\](.*)", rest)
            if not match:
                expansions = [e + rest for e in expansions]
                break
            prefix, body, rest = match.groups()
            expansions = [e + prefix + v for e in expansions for v in _expand_range(body, nodelist)]
        hosts.extend(expansions)
    return hosts


@dataclass(frozen=True)
class SlurmTask:
    """Where a SLURM task sits: job, node count and index, and the first host (the master)."""

    job_id: str
    nnodes: int
    node_rank: int
    hosts: tuple[str, ...]
    procid: int | None

    @property
    def master_addr(self) -> str:
        return self.hosts[0]


def slurm_task(env: Mapping[str, str]) -> SlurmTask | None:
    """Read the SLURM variables of this process; None outside a SLURM job."""
    if "SLURM_JOB_ID" not in env:
        return None
    hosts = tuple(expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")))
    nnodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or len(hosts) or 1)
    if hosts and len(hosts) != nnodes:
        raise UsageError(f"SLURM gave {len(hosts)} hosts ({','.join(hosts)}) but SLURM_NNODES={nnodes}.")
    procid = env.get("SLURM_PROCID")
    return SlurmTask(env["SLURM_JOB_ID"], nnodes, int(env.get("SLURM_NODEID", 0)), hosts,
                     int(procid) if procid is not None else None)
