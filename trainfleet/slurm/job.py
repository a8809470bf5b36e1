"""What runs inside a submitted job: one trainfleet agent per node, requeued on preemption.

submitit starts one task per node (``srun --ntasks-per-node=1``) and calls a
:class:`FleetJob` in each. The job runs ``launch`` in a child process: inside the
srun step ``launch`` takes its node rank, master and port from SLURM (see
``allocation.py``), so the multi-node machinery (control store, heartbeats, restarts,
failure reports) is the launcher's own, not a second copy. One agent per node rather
than one task per worker: the agent forks workers from one torch import (1.4 s to
ready instead of ~3 s), supervises them, and relays a signal to every node.

Preemption: SLURM sends the early signal (USR2) to the job's processes; submitit's
handler in task 0 calls :meth:`FleetJob.checkpoint`, which passes the signal to the
agent (it relays it to every worker on every node; the engine's ``should_stop()`` makes
all ranks stop at the same step and save), waits for the agent to finish, and hands
submitit a copy of itself to requeue. The requeued job finds the checkpoint in
the job folder's checkpoints (``Engine.checkpoint_dir``) and the engine resumes from it.
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trainfleet.slurm import records

log = logging.getLogger(__name__)


def _agent_preexec(parent: int) -> None:
    from trainfleet.utils.process import die_with_parent

    die_with_parent(parent, signal.SIGTERM)  # the agent stops its workers on SIGTERM


@dataclass
class FleetJob:
    """The callable submitit pickles into the job (one per array task).

    Args:
        launch_args: ``launch`` flags that shape the run (``--nodes 2 --gpus 2 ...``).
        target: the script, or module with ``module``.
        script_args: the script's arguments for this task (placeholders filled).
        folder: the job folder pattern (``runs/%A``); submitit fills in the job id.
        index: the array task index; None for a single job.
        values: the sweep values of this task (for the records).
        max_requeues: preemptions/timeouts after which the job is no longer requeued.
        stop_wait_s: how long the agent gets to checkpoint after the signal.
        stop_signal: the signal passed on to the agent (the job's early signal).
        debug: run ``launch --debug`` in this very process (``--cluster debug``).
        requeues: how many times this job was requeued so far.
        cli_module: runs ``launch`` (``python -m CLI_MODULE launch ...``), given by the
            submitter: slurm never names the CLI.
        job_env: variables the job gives its workers, a template with ``{task_dir}``,
            ``{requeues}`` and ``{index}`` (a variable with ``{index}`` only for array tasks).
        drop_env: variables of the submitting shell that the job's own launch must not see.
    """

    launch_args: list[str]
    target: str
    script_args: list[str]
    folder: str
    cli_module: str = ""
    job_env: dict[str, str] = field(default_factory=dict)
    drop_env: tuple[str, ...] = ()
    module: bool = False
    index: int | None = None
    values: dict[str, str] = field(default_factory=dict)
    max_requeues: int = 3
    stop_wait_s: float = 60.0
    stop_signal: str = "USR2"
    debug: bool = False
    cwd: str = field(default_factory=os.getcwd)
    requeues: int = 0
    _proc: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None  # a running child is not part of what is requeued
        return state

    # ----- where -------------------------------------------------------------------------
    def task_dir(self) -> Path:
        """This task's folder: the job folder, or ``task<I>/`` inside it for an array."""
        folder = self.folder
        if "%" in folder:  # runs/%A: the job id is known once the job runs
            import submitit

            folder = str(submitit.JobEnvironment().paths.folder)
        return records.task_dir(Path(self.cwd, folder), self.index)

    def command(self, task_dir: Path) -> list[str]:
        """The ``launch`` line this node runs."""
        argv = [*self.launch_args, "--log-dir", str(task_dir / "logs")]
        if self.debug:
            argv.append("--debug")
        return [*argv, *(["-m"] if self.module else []), self.target, *self.script_args]

    def environment(self, task_dir: Path) -> dict[str, str]:
        """This node's environment: the submitting shell's, less ``drop_env`` (the job's own
        launch runs here, it does not submit again), plus ``job_env`` filled in."""
        env = {k: v for k, v in os.environ.items() if k not in self.drop_env}
        for name, template in self.job_env.items():
            if "{index}" in template and self.index is None:
                continue
            env[name] = template.format(task_dir=task_dir, requeues=self.requeues, index=self.index)
        return env

    # ----- run ---------------------------------------------------------------------------
    def __call__(self) -> int:
        task_dir = self.task_dir()
        primary = os.environ.get("SLURM_NODEID", "0") == "0"
        if primary:
            records.update_task_state(task_dir, state="RUNNING", requeues=self.requeues, index=self.index,
                                      values=self.values, started=time.time(), exit_code=None,
                                      host=socket.gethostname())
        code = self._run_debug(task_dir) if self.debug else self._run_agent(task_dir)
        if primary:
            records.update_task_state(task_dir, state="COMPLETED" if code == 0 else "FAILED", exit_code=code,
                                      ended=time.time())
        if code != 0 and not self.debug:  # submitit then records the job as failed
            raise RuntimeError(f"the trainfleet agent exited with code {code}; logs in {task_dir / 'logs'}")
        return code

    def _run_agent(self, task_dir: Path) -> int:
        command = [sys.executable, "-m", self.cli_module, "launch", *self.command(task_dir)]
        self._proc = subprocess.Popen(command, cwd=self.cwd, env=self.environment(task_dir),
                                      preexec_fn=lambda parent=os.getpid(): _agent_preexec(parent))
        return self._proc.wait()

    def _run_debug(self, task_dir: Path) -> int:
        """In this process, so breakpoints in the script work (submitit's DebugExecutor)."""
        saved = dict(os.environ)
        os.environ.update(self.environment(task_dir))
        try:  # the module the submitter named: slurm never imports the CLI (it is what wires slurm in)
            cli = importlib.import_module(f"{self.cli_module}.launch")
            return cli.main(self.command(task_dir))
        finally:
            os.environ.clear()
            os.environ.update(saved)

    # ----- preemption --------------------------------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit (task 0) on the early signal: stop the run at a checkpoint,
        then return the submission to requeue, or None to end the job here."""
        import submitit

        task_dir = self.task_dir()
        code = self._stop_agent()
        if self.requeues >= self.max_requeues:
            log.warning("not requeued: %d requeue(s) already, --max-requeues %d", self.requeues, self.max_requeues)
            records.update_task_state(task_dir, state="STOPPED", exit_code=code, ended=time.time(),
                                      reason=f"--max-requeues {self.max_requeues} reached")
            return None
        records.update_task_state(task_dir, state="REQUEUED", requeues=self.requeues + 1, exit_code=code,
                                  requeued_at=time.time())
        return submitit.helpers.DelayedSubmission(replace(self, requeues=self.requeues + 1, _proc=None))

    def _stop_agent(self) -> int | None:
        """Pass the signal on to the agent and wait for it to checkpoint and exit.

        Runs in submitit's signal handler while ``__call__`` sits in ``Popen.wait()``,
        which holds the Popen's wait lock: a nested ``wait()`` would spin until its
        timeout, so this polls with ``waitid(WNOWAIT)``, which leaves the child to it.
        """
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc is not None else None
        proc.send_signal(getattr(signal, f"SIG{self.stop_signal}"))
        deadline = time.monotonic() + self.stop_wait_s
        while time.monotonic() < deadline:
            try:
                info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # already reaped
                return proc.returncode
            if info is not None:
                return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            time.sleep(0.1)
        log.warning("the agent did not stop within %.0fs; requeueing without waiting", self.stop_wait_s)
        return None
