"""The job folder and its records, so ``status``, ``logs`` and ``cancel`` work from any shell.

Layout of a job folder (``runs/<job id>/``)::

    trainfleet.json         what was submitted: command, resources, tasks, cluster
    <id>_submission.sh      the sbatch script (submitit's files: *_log.out/err, pickles)
    logs/node<N>/rank<R>.log            one job
    task<I>/logs/node<N>/rank<R>.log    array task I (also task<I>/checkpoints, task<I>/task.json)
    checkpoints/            what the engine saves for a requeued job to resume from
    task.json               state, exit code, requeues of the job (or of each array task)

``~/.local/state/trainfleet/jobs/<job id>`` (``TRAINFLEET_STATE_DIR``) points at the folder.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trainfleet.utils.errors import UsageError

RECORD = "trainfleet.json"
TASK_STATE = "task.json"


def state_dir() -> Path:
    base = os.environ.get("TRAINFLEET_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "trainfleet")
    return Path(base) / "jobs"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def save_record(folder: Path, record: dict[str, Any]) -> None:
    """Write the job's record into its folder and index it by job id."""
    write_json(folder / RECORD, record)
    index = state_dir() / str(record["job_id"])
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(str(folder.resolve()))


def find_job(job: str) -> tuple[Path, dict[str, Any]]:
    """The folder and record of a job id (``4242`` or ``4242_3``) or job folder.

    Raises:
        UsageError: no such job recorded here.
    """
    job_id = job.split("_")[0]
    candidates = [Path(job), state_dir() / job_id]
    for candidate in candidates:
        folder = Path(candidate.read_text().strip()) if candidate.is_file() else candidate
        if (folder / RECORD).is_file():
            return folder, json.loads((folder / RECORD).read_text())
    raise UsageError(f"no trainfleet job {job!r} is recorded (looked in {state_dir()}).",
                     "pass the job id `launch --cluster` printed, or the job's folder.")


def task_dir(folder: Path, index: int | None) -> Path:
    """Where a task's logs, checkpoints and state live: the job folder, or task<I>/ of an array."""
    return folder if index is None else folder / f"task{index}"


def update_task_state(folder: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``task.json`` (stamped with the time) and return it."""
    path = folder / TASK_STATE
    state = read_task_state(folder)
    state.update(fields, updated=time.time())
    write_json(path, state)
    return state


def read_task_state(folder: Path) -> dict[str, Any]:
    path = folder / TASK_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def rank_log(folder: Path, rank: int) -> Path | None:
    """The newest log file of ``rank`` below ``folder/logs`` (restarts add ``.attemptN``)."""
    logs = sorted((folder / "logs").glob(f"node*/rank{rank}.*log"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else None
