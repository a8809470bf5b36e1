"""``launch``: where the job runs: submitted (``--cluster``), over ssh (``--hosts``), inside a
SLURM allocation, or on this machine. Its flags are in :mod:`trainfleet.cli.launch_args`.
Bad input exits 2 with one line and no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from trainfleet.cli.common import exit_now, guarded
from trainfleet.cli.launch_args import CLI_MODULE, attach_dash_values, build_parser, config_from_args
from trainfleet.cli.submit import submit
from trainfleet.engine import contract
from trainfleet.launcher.config import parse_nodes
from trainfleet.launcher.flags import FLAGS_BY_DEST
from trainfleet.utils.errors import UsageError

SUBMIT_ONLY = ("array", "sweep", "wait", "partition", "slurm_opt")
HOSTS_ONLY = ("ssh_opt", "env")

def _in_allocation(ns: argparse.Namespace, argv: Sequence[str]) -> tuple[int | None, dict[str, object]]:
    """Inside a SLURM allocation: re-run through srun (batch shell), or take this task's node rank
    and master from SLURM (inside srun). Returns (an exit code when done here, LaunchConfig fields)."""
    from trainfleet.slurm.allocation import plan_in_allocation, run_srun

    if ns.node_rank is not None or ns.debug:
        return None, {}
    explicit_master = FLAGS_BY_DEST["master_addr"].env_name in os.environ
    step = plan_in_allocation(parse_nodes(ns.nodes), ns.master_addr, ns.master_port, os.environ, explicit_master)
    if step is None:
        return None, {}
    if step.srun:
        return run_srun(step.task, [sys.executable, "-m", CLI_MODULE, "launch"], argv, step.elastic,
                        exit_file_variable=contract.EXIT_FILE), {}
    return None, {"nodes": step.nodes, "node_rank": step.node_rank, "master_addr": step.master_addr,
                  "master_port": step.master_port}


def run_launch(ns: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """``launch`` after parsing: submit, go over ssh, or run here (maybe inside an allocation)."""
    if ns.cluster:
        return submit(ns, list(argv))
    given = [f"--{dest.replace('_', '-')}" for dest in SUBMIT_ONLY if getattr(ns, dest)]
    if given:
        raise UsageError(f"{given[0]} is for submitted jobs, but no --cluster was given.",
                         f"add --cluster slurm (or local) to submit, or drop {given[0]}.")
    if ns.hosts or ns.hostfile:
        return _run_hosts(ns)
    for dest in HOSTS_ONLY:
        if getattr(ns, dest):
            flag = FLAGS_BY_DEST[dest].names[0]
            raise UsageError(f"{flag} {getattr(ns, dest)[0]!r} is for --hosts, but no --hosts was given.",
                             f"add --hosts A,B to start the nodes over ssh, or drop {flag}.")
    from trainfleet.launcher.launch import launch

    code, placed = _in_allocation(ns, argv)
    if code is not None:
        return code
    cfg = config_from_args(ns, role="node" if placed else "local", **placed)
    code = launch(cfg)
    where = contract.exit_file()
    if cfg.node_rank == 0 and where:  # the batch step's launch reports node 0's result
        Path(where).write_text(str(code))
    return code


def _run_hosts(ns: argparse.Namespace) -> int:
    """``--hosts``/``--hostfile``: every node started from here over ssh."""
    from trainfleet.launcher.host_list import plan_from_args, workers_per_host
    from trainfleet.launcher.hosts import run_hosts

    master = FLAGS_BY_DEST["master_addr"]
    given = master.env_name in os.environ or ns.master_addr != master.default
    plan = plan_from_args(ns.hosts, ns.hostfile, ns.ssh_opt, ns.env, ns.master_addr if given else None)
    if ns.node_rank is not None:
        raise UsageError(f"--node-rank {ns.node_rank} with --hosts: the hosts' order gives the node ranks.",
                         "drop --node-rank.")
    low, high = parse_nodes(ns.nodes)
    count = len(plan.hosts)
    if high not in (1, count):
        raise UsageError(f"--nodes {high} but {count} hosts were given.",
                         f"drop --nodes, or give --nodes MIN:{count} for an elastic job.")
    low = low if high == count else count
    # validated as node 0 of a job whose nodes are separate machines (not nodes simulated on this host)
    cfg = config_from_args(ns, role="node", node_rank=0, nodes=count, min_nodes=low,
                           gpus=workers_per_host(plan, ns.gpus))
    return run_hosts(cfg, plan)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``launch``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(attach_dash_values(argv))
    return guarded(lambda: run_launch(ns, argv))


def console() -> None:
    """Console script ``launch``: :func:`main`, then a prompt exit."""
    exit_now(main())
