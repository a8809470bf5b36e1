"""``launch --cluster slurm|local|debug``: submit the job through submitit.

Checks everything first (the script, the names, sbatch on PATH, the partition and the
geometry, the sweep), so bad input is one line and nothing is submitted. The job runs
a :class:`trainfleet.slurm.job.FleetJob` on every node, which runs this same launcher.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainfleet.launcher.config import LaunchConfig
from trainfleet.slurm import records, status
from trainfleet.slurm.resources import ClusterResources, parse_slurm_opts
from trainfleet.slurm.sweep import ArrayTask, array_tasks, parse_sweep
from trainfleet.utils.errors import UsageError

CLUSTERS = ("slurm", "local", "debug")
# launch flags that the job's own `launch` receives as they were given
FORWARDED = (("strategy", "--strategy"), ("precision", "--precision"), ("amp_backend", "--amp-backend"),
             ("start_method", "--start-method"), ("grace_period", "--grace-period"),
             ("max_restarts", "--max-restarts"), ("heartbeat_timeout", "--heartbeat-timeout"),
             ("rendezvous_timeout", "--rendezvous-timeout"), ("collective_timeout", "--collective-timeout"))


@dataclass
class Submission:
    """What ``launch --cluster`` decided: where, with what, which tasks."""

    cluster: str
    cfg: LaunchConfig
    resources: ClusterResources
    tasks: list[ArrayTask]
    array: bool
    root: Path
    max_requeues: int


def plan(ns: argparse.Namespace) -> Submission:
    """Validate a ``launch --cluster`` request without submitting anything.

    Raises:
        UsageError: the first thing wrong, as one line.
    """
    if ns.cluster not in CLUSTERS:
        raise UsageError(f"--cluster {ns.cluster!r}: expected one of {list(CLUSTERS)}.")
    if ns.max_requeues < 0:
        raise UsageError(f"--max-requeues {ns.max_requeues} must be >= 0.")
    sweep = parse_sweep(ns.sweep or [])
    tasks = array_tasks(sweep, ns.array)
    from trainfleet.launcher.cli import launch_config_from_args

    gpus = 0 if ns.cpu else (ns.gpus or 1)
    # The job's nodes, not this machine, have the devices: do not check --gpus here.
    # Validated as node 0 of a job whose nodes are separate machines (SLURM's), not as nodes
    # simulated on one host, which would have to share one host's GPUs.
    given_rank, ns.node_rank = ns.node_rank, (0 if ns.node_rank is None and ns.cluster != "debug" else ns.node_rank)
    try:
        cfg = launch_config_from_args(ns, cuda_devices=gpus)
    finally:
        ns.node_rank = given_rank
    if ns.cluster == "debug" and (ns.nodes > 1 or len(tasks) > 1):
        raise UsageError("--cluster debug runs one process in this one, but more than one node or task was asked.",
                         "drop --nodes/--array/--sweep to debug, or use --cluster local.")
    resources = ClusterResources(
        nodes=ns.nodes, workers=ns.gpus or 1, gpus=gpus, cpus_per_task=ns.cpus_per_task, mem_gb=ns.mem_gb,
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
    return Submission(ns.cluster, cfg, resources, tasks, bool(sweep) or ns.array is not None,
                      Path(ns.job_dir).resolve(), ns.max_requeues)


def _inner_launch_args(ns: argparse.Namespace, sub: Submission) -> list[str]:
    argv = ["--nodes", sub.cfg.nodes_spec, "--gpus", str(sub.resources.workers)]
    if ns.cpu:
        argv.append("--cpu")
    for dest, flag in FORWARDED:
        value = getattr(ns, dest)
        if value is not None:
            argv += [flag, str(value)]
    for option in ns.strategy_opt or ():
        argv += ["--strategy-opt", option]
    return argv


def _executor(sub: Submission, folder: Path) -> Any:
    import submitit

    if sub.cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=sub.max_requeues)
        executor.update_parameters(**sub.resources.slurm_parameters())
    elif sub.cluster == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(**sub.resources.local_parameters())
    else:
        executor = submitit.DebugExecutor(folder=str(folder))
    return executor


def _jobs(sub: Submission, ns: argparse.Namespace, folder: Path) -> tuple[list[Any], list[Any]]:
    from trainfleet.slurm.job import FleetJob

    launch_args = _inner_launch_args(ns, sub)
    fleet = [FleetJob(launch_args=launch_args, target=sub.cfg.target, module=sub.cfg.module,
                      script_args=task.script_args(sub.cfg.args), folder=str(folder),
                      index=task.index if sub.array else None, values=task.values, max_requeues=sub.max_requeues,
                      stop_wait_s=max(5.0, sub.resources.signal_delay_s - 15.0), stop_signal=sub.resources.signal,
                      debug=sub.cluster == "debug") for task in sub.tasks]
    executor = _executor(sub, folder)
    created = not sub.root.exists()
    sub.root.mkdir(parents=True, exist_ok=True)
    before = set(sub.root.iterdir())
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # sbatch's complaint comes back in the error
            if len(fleet) == 1:
                jobs = [executor.submit(fleet[0])]
            else:
                with executor.batch():
                    jobs = [executor.submit(job) for job in fleet]
        _remove_new_files(sub.root, before, failed=False)
        return fleet, jobs
    except Exception as err:  # submitit.core.utils.FailedJobError: sbatch refused it
        if type(err).__name__ != "FailedJobError":
            raise
        _remove_new_files(sub.root, before, failed=True)
        if created and not any(sub.root.iterdir()):
            sub.root.rmdir()
        reason = next((ln for ln in reversed(str(err).splitlines()) if "error" in ln.lower()), str(err))
        raise UsageError(f"sbatch refused the job: {reason.strip()}", "check the resources asked for "
                         "(--partition, --gpus, --mem-gb, --time, --slurm-opt).") from err


def _remove_new_files(root: Path, before: set[Path], failed: bool) -> None:
    """submitit leaves ``.submission_file_*`` links (and, when sbatch refused, the script
    and pickles) in the folder above the job's: nothing of a refused job may stay."""
    for path in set(root.iterdir()) - before:
        if path.is_symlink() or (failed and path.is_file()):
            path.unlink()


def submit(ns: argparse.Namespace, argv: list[str]) -> int:
    """Submit; print the job id and where its logs go; with --wait follow it to its end."""
    sub = plan(ns)
    if sub.cluster == "slurm":
        pattern = sub.root / "%A"  # submitit fills in the (array) job id
    else:
        pattern = sub.root / f"{sub.cluster}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    fleet, jobs = _jobs(sub, ns, pattern)
    job_id = str(jobs[0].job_id).split("_")[0]
    folder = Path(str(pattern).replace("%A", job_id))
    if sub.cluster != "slurm":
        job_id = folder.name
    record = {"job_id": job_id, "cluster": sub.cluster, "submitted_at": time.time(), "argv": argv,
              "cwd": str(Path.cwd()), "nodes": sub.cfg.nodes, "workers": sub.resources.workers,
              "array": sub.array, "max_requeues": sub.max_requeues,
              "tasks": [{"index": job.index, "values": job.values, "args": job.script_args,
                         "submitit_id": str(sj.job_id),
                         "pid": int(sj.job_id) if sub.cluster == "local" else None} for job, sj in zip(fleet, jobs)]}
    records.save_record(folder, record)
    what = (f"array {job_id} ({len(jobs)} tasks of {sub.cfg.nodes} node(s) x {sub.resources.workers} worker(s))"
            if sub.array else f"job {job_id} ({sub.cfg.nodes} node(s) x {sub.resources.workers} worker(s))")
    print(f"submitted {what}; logs: {folder}/  follow: trainfleet logs {job_id} --follow", flush=True)
    if sub.cluster == "debug":
        code = jobs[0].result()
        print(status.format_status(folder, record, status.job_status(folder, record)))
        return code
    if not ns.wait:
        return 0
    statuses = status.follow(folder, record)
    print(status.format_status(folder, record, statuses, tail=0), flush=True)
    return status.exit_code(statuses)
