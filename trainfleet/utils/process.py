"""Process hygiene shared by the launcher and the SLURM job: children die with their parent;
a process's state from /proc; the processes that carry an environment variable."""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``signum`` to this process when its parent dies; exit now if
    the parent (``parent_pid``) is already gone. Call it first thing in the child."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's killpg still covers us
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists (a zombie too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (``T``: stopped, ``Z``: zombie), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def processes_with(variable: str, value: str | None = None) -> dict[int, int]:
    """``{pid: parent pid}`` of the live processes whose environment sets ``variable`` (to
    ``value`` when given). An environment is inherited, so this finds a job's workers even
    after they were adopted by init or moved to sessions of their own."""
    needle = b"\0" + f"{variable}=".encode() + (value.encode() + b"\0" if value is not None else b"")
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if needle not in b"\0" + handle.read().rstrip(b"\0") + b"\0":
                    continue
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            found[int(pid)] = int(fields[1])
    return found


EARLY_SIGNALS: list[int] = []  # checkpoint requests that came before the script's Engine existed


def hold_checkpoint_requests() -> None:
    """In a worker, before the script runs: SIGUSR1/SIGUSR2 (checkpoint requests relayed by the
    launcher) are kept for the Engine instead of killing the process. A request can come at
    any time, e.g. while the script still imports; the Engine takes it over when it starts."""
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, lambda number, _frame: EARLY_SIGNALS.append(number))
