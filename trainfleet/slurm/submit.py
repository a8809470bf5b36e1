"""Submitting a job through submitit (``launch --cluster slurm|local|debug``).

The CLI checks the request first (``trainfleet/cli/submit.py``: the script, the names, sbatch on
PATH, the partition and the geometry, the sweep), so bad input is one line and nothing is
submitted. It hands this module a :class:`Submission` in plain terms: the job's own ``launch``
flags, the command that runs them, and the environment the job adds. The job runs a
:class:`trainfleet.slurm.job.FleetJob` on every node, which runs that same launcher.
"""
from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainfleet.slurm import records, status
from trainfleet.slurm.resources import ClusterResources
from trainfleet.slurm.sweep import ArrayTask
from trainfleet.utils.errors import UsageError

CLUSTERS = ("slurm", "local", "debug")


@dataclass
class Submission:
    """What ``launch --cluster`` decided: where, what each node runs, which tasks.

    Attributes:
        launch_args: the job's own ``launch`` flags (``--nodes 2 --gpus 2 --strategy ddp ...``).
        cli_module: runs ``launch ARGS`` as ``python -m CLI_MODULE launch ARGS``.
        job_env: variables the job adds for its workers, a template filled in per task.
        drop_env: variables of the submitting shell the job's own launch must not see.
    """

    cluster: str
    resources: ClusterResources
    tasks: list[ArrayTask]
    array: bool
    root: Path
    max_requeues: int
    launch_args: list[str]
    target: str
    module: bool
    script_args: list[str]
    nodes: int
    cli_module: str
    job_env: dict[str, str] = field(default_factory=dict)
    drop_env: tuple[str, ...] = ()


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


def _jobs(sub: Submission, folder: Path) -> tuple[list[Any], list[Any]]:
    from trainfleet.slurm.job import FleetJob

    fleet = [FleetJob(launch_args=sub.launch_args, target=sub.target, module=sub.module, cli_module=sub.cli_module,
                      job_env=dict(sub.job_env), drop_env=tuple(sub.drop_env),
                      script_args=task.script_args(sub.script_args), folder=str(folder),
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


def submit(sub: Submission, argv: list[str], wait: bool = False) -> int:
    """Submit; print the job id and where its logs go; with ``wait`` follow it to its end."""
    if sub.cluster == "slurm":
        pattern = sub.root / "%A"  # submitit fills in the (array) job id
    else:
        pattern = sub.root / f"{sub.cluster}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    fleet, jobs = _jobs(sub, pattern)
    job_id = str(jobs[0].job_id).split("_")[0]
    folder = Path(str(pattern).replace("%A", job_id))
    if sub.cluster != "slurm":
        job_id = folder.name
    record = {"job_id": job_id, "cluster": sub.cluster, "submitted_at": time.time(), "argv": argv,
              "cwd": str(Path.cwd()), "nodes": sub.nodes, "workers": sub.resources.workers,
              "array": sub.array, "max_requeues": sub.max_requeues,
              "tasks": [{"index": job.index, "values": job.values, "args": job.script_args,
                         "submitit_id": str(sj.job_id),
                         "pid": int(sj.job_id) if sub.cluster == "local" else None} for job, sj in zip(fleet, jobs)]}
    records.save_record(folder, record)
    what = (f"array {job_id} ({len(jobs)} tasks of {sub.nodes} node(s) x {sub.resources.workers} worker(s))"
            if sub.array else f"job {job_id} ({sub.nodes} node(s) x {sub.resources.workers} worker(s))")
    print(f"submitted {what}; logs: {folder}/  follow: trainfleet logs {job_id} --follow", flush=True)
    if sub.cluster == "debug":
        code = jobs[0].result()
        print(status.format_status(folder, record, status.job_status(folder, record)))
        return code
    if not wait:
        return 0
    statuses = status.follow(folder, record)
    print(status.format_status(folder, record, statuses, tail=0), flush=True)
    return status.exit_code(statuses)
