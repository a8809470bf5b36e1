"""Entry point of one worker process (runs in the child after fork/spawn).

The child becomes a session leader, so the launcher's ``killpg`` reaches anything
it starts (DataLoader workers, subprocesses; pytorch/pytorch#113231), asks the
kernel to kill it if the launcher dies (PR_SET_PDEATHSIG), sends its output to its
own log file and runs the user's script as ``__main__``.
"""
from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import sys
import time
import traceback

from trainfleet.launcher.workers import WorkerSpec
from trainfleet.utils.errors import UsageError
from trainfleet.utils.process import die_with_parent, hold_checkpoint_requests, pid_alive


def _redirect_output(log_path: str) -> None:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered: the console tails it
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def _write_error_file(path: str, err: BaseException) -> None:
    record = {
        "message": f"{type(err).__name__}: {err}",
        "traceback": traceback.format_exc(),
        "timestamp": time.time(),
        "pid": os.getpid(),
    }
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(record, handle)
    os.replace(tmp, path)


def _exit_code(err: SystemExit) -> int:
    if err.code is None:
        return 0
    if isinstance(err.code, int):
        return err.code
    print(err.code, file=sys.stderr)
    return 1


def run_target(target: str, args: list[str], module: bool) -> None:
    """Run a script or module as ``__main__`` with ``sys.argv`` set, like ``python``."""
    if module:
        sys.argv = [target, *args]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")


def worker_main(spec: WorkerSpec) -> None:
    """Set the worker up, run the target, and exit with its status (never returns)."""
    os.setsid()
    if spec.start_method == "forkserver":  # the parent is the fork server, which ends when the launcher does
        die_with_parent(os.getppid())
        if not pid_alive(spec.launcher_pid):
            os._exit(1)
    else:
        die_with_parent(spec.launcher_pid)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    hold_checkpoint_requests()
    _redirect_output(spec.log_path)
    os.environ.update(spec.env)
    if spec.threads and "torch" in sys.modules:
        # torch was imported by the launcher before the fork, so OMP_NUM_THREADS in
        # the environment comes too late for this process: set the pool size directly.
        sys.modules["torch"].set_num_threads(spec.threads)
    atexit._clear()  # handlers registered by the launcher are not the worker's
    code = 1
    try:
        run_target(spec.target, spec.args, spec.module)
        code = 0
    except SystemExit as err:
        code = _exit_code(err)
    except UsageError as err:  # bad input found in the worker (e.g. a batch size): one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        _write_error_file(spec.error_file, err)
        code = 2
    except BaseException as err:  # report every failure, KeyboardInterrupt included
        traceback.print_exc()
        _write_error_file(spec.error_file, err)
        sys.last_type, sys.last_value, sys.last_traceback = type(err), err, err.__traceback__  # as Python does
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
