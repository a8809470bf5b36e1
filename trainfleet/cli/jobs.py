"""``trainfleet status|logs|cancel JOB``: jobs submitted with ``launch --cluster``."""
from __future__ import annotations

import argparse
from typing import Any

from trainfleet.utils.errors import UsageError


def _job_status(ns: argparse.Namespace) -> int:
    from trainfleet.slurm import records, status

    folder, record = records.find_job(ns.job)
    print(status.format_status(folder, record, status.job_status(folder, record), tail=ns.lines))
    return 0


def _job_logs(ns: argparse.Namespace) -> int:
    from trainfleet.slurm import records, status

    folder, record = records.find_job(ns.job)
    task = ns.task if ns.task is not None else (int(ns.job.split("_")[1]) if "_" in ns.job else None)
    if record.get("array") and task is None:
        task = record["tasks"][0]["index"]
    if task is not None and task not in [t["index"] for t in record["tasks"]]:
        raise UsageError(f"--task {task}: job {record['job_id']} has tasks 0-{len(record['tasks']) - 1}.")
    if not ns.follow and records.rank_log(records.task_dir(folder, task), ns.rank) is None:
        raise UsageError(f"no log of rank {ns.rank} yet in {records.task_dir(folder, task) / 'logs'}.",
                         "the job may still be pending: see `trainfleet status`, or use --follow.")
    status.follow(folder, record, rank=ns.rank, task=task, until_done=ns.follow)
    return 0


def _job_cancel(ns: argparse.Namespace) -> int:
    from trainfleet.slurm import records, status

    folder, record = records.find_job(ns.job)
    status.cancel(record)
    print(f"cancelled job {record['job_id']}")
    return 0


def add_job_commands(sub: Any) -> None:
    """``trainfleet status|logs|cancel JOB`` for jobs submitted with ``launch --cluster``."""
    show = sub.add_parser("status", help="state of a submitted job or array (table of tasks)")
    show.add_argument("job", help="job id (or job folder)")
    show.add_argument("--lines", type=int, default=5, help="last lines of rank 0's log (default 5)")
    show.set_defaults(func=_job_status)
    logs = sub.add_parser("logs", help="a rank's log of a submitted job")
    logs.add_argument("job", help="job id, JOB_TASK for an array task, or job folder")
    logs.add_argument("--rank", type=int, default=0, help="global rank (default 0)")
    logs.add_argument("--task", type=int, help="array task index")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(func=_job_logs)
    cancel = sub.add_parser("cancel", help="cancel a submitted job (every task of an array)")
    cancel.add_argument("job", help="job id (or job folder)")
    cancel.set_defaults(func=_job_cancel)
