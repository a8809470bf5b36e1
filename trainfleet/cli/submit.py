"""``launch --cluster slurm|local|debug``: check the request, then hand it to :mod:`trainfleet.slurm.submit`.

Everything is checked before anything is submitted (the script, the names, sbatch on PATH,
the partition and the geometry, the sweep), so bad input is one line. The job's own ``launch``
line is derived from the validated LaunchConfig through the flag table
(:func:`trainfleet.launcher.flags.job_launch_args`): a flag cannot be dropped on the way.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from trainfleet.cli.launch_args import CLI_MODULE, CLUSTER_VARIABLE, config_from_args
from trainfleet.engine import contract
from trainfleet.launcher.flags import job_launch_args
from trainfleet.launcher.store_auth import new_token
from trainfleet.slurm.resources import ClusterResources, parse_slurm_opts
from trainfleet.slurm.submit import CLUSTERS, Submission
from trainfleet.slurm.submit import submit as submit_job
from trainfleet.slurm.sweep import array_tasks, parse_sweep
from trainfleet.utils.errors import UsageError


def plan(ns: argparse.Namespace) -> Submission:
    """Validate a ``launch --cluster`` request without submitting anything.

    Raises:
        UsageError: the first thing wrong, as one line.
    """
    if ns.cluster not in CLUSTERS:
        raise UsageError(f"--cluster {ns.cluster!r}: expected one of {list(CLUSTERS)}.")
    if ns.max_requeues < 0:
        raise UsageError(f"--max-requeues {ns.max_requeues} must be >= 0.")
    if ns.hosts or ns.hostfile:
        flag = "--hosts" if ns.hosts else "--hostfile"
        raise UsageError(f"{flag} with --cluster {ns.cluster}: a submitted job runs on the nodes SLURM gives it.",
                         f"drop {flag} to submit, or drop --cluster to start the hosts over ssh.")
    tasks = array_tasks(parse_sweep(ns.sweep or []), ns.array)
    gpus = 0 if ns.cpu else (ns.gpus or 1)
    # The job's nodes, not this machine, have the devices: --gpus is not checked here. A debug
    # job runs in this process; the others are validated as node 0 of a job whose nodes are
    # separate machines (SLURM's), not as nodes simulated on one host sharing its GPUs.
    if ns.cluster == "debug":
        cfg = config_from_args(ns, cuda_devices=gpus)
    else:
        cfg = config_from_args(ns, role="submit", node_rank=ns.node_rank or 0, cuda_devices=gpus)
    if ns.cluster == "debug" and (cfg.nodes > 1 or len(tasks) > 1):
        raise UsageError("--cluster debug runs one process in this one, but more than one node or task was asked.",
                         "drop --nodes/--array/--sweep to debug, or use --cluster local.")
    resources = ClusterResources(
        nodes=cfg.nodes, workers=ns.gpus or 1, gpus=gpus, cpus_per_task=ns.cpus_per_task, mem_gb=ns.mem_gb,
        time_min=ns.time, partition=ns.partition, account=ns.account, qos=ns.qos, constraint=ns.constraint,
        exclusive=ns.exclusive, job_name=ns.job_name or Path(cfg.target).stem, signal=ns.signal,
        signal_delay_s=ns.signal_delay, array_parallelism=ns.array_parallelism,
        extra=parse_slurm_opts(ns.slurm_opt or []))
    if cfg.elastic:  # a failed node must not end the allocation: the survivors go on
        resources.extra.setdefault("no-kill", True)
    if ns.cluster == "slurm":
        from trainfleet.slurm.cluster import check_request, require_sbatch

        require_sbatch()
        check_request(resources)
    return Submission(ns.cluster, resources, tasks, bool(ns.sweep) or ns.array is not None,
                      Path(ns.job_dir).resolve(), ns.max_requeues,
                      launch_args=job_launch_args(cfg, resources.workers), target=cfg.target, module=cfg.module,
                      script_args=list(cfg.args), nodes=cfg.nodes, cli_module=CLI_MODULE,
                      job_env={**contract.job_variables(), contract.JOB_TOKEN: cfg.job_token or new_token()},
                      drop_env=(CLUSTER_VARIABLE,))


def submit(ns: argparse.Namespace, argv: list[str]) -> int:
    """Submit; print the job id and where its logs go; with --wait follow it to its end."""
    return submit_job(plan(ns), argv, wait=ns.wait)
