"""Shared fixtures. The autouse ones fail a test that leaks an environment variable,
a process group, a child process or a listening socket."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
BIN = Path(sys.executable).parent
# Set by libraries on their own, not by the code under test: pytest for every test,
# torch._inductor the first time an optimizer imports it.
ENV_SET_BY_LIBRARIES = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


def _children(pid: int) -> set[int]:
    """Live descendants of ``pid`` (zombies excluded), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _listening_inodes() -> set[str]:
    """Inodes of this process's sockets in LISTEN state."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                listening.add(cols[9])
    return listening


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail the test if it leaves env vars, a process group, children or listeners behind."""
    env_before = dict(os.environ)
    listeners_before = _listening_inodes()
    yield
    problems = []
    changed = {k for k in set(env_before) | set(os.environ)
               if env_before.get(k) != os.environ.get(k) and k not in ENV_SET_BY_LIBRARIES}
    if changed:
        problems.append(f"environment variables changed: {sorted(changed)}")
        for key in changed:
            if key in env_before:
                os.environ[key] = env_before[key]
            else:
                os.environ.pop(key, None)
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            problems.append("a torch.distributed process group was left initialized")
    deadline = time.monotonic() + 5
    while _children(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftover = _children(os.getpid())
    if leftover:
        problems.append(f"child processes left running: {sorted(leftover)}")
        for pid in leftover:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    new_listeners = _listening_inodes() - listeners_before
    if new_listeners:
        problems.append(f"{len(new_listeners)} listening socket(s) left open")
    if problems:
        pytest.fail("; ".join(problems))


def horovod_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


needs_horovod = pytest.mark.skipif(not horovod_available(),
                                   reason="Horovod is not installed: run scripts/build-horovod.sh "
                                          "(scripts/test.sh does it)")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_cli(name: str, *args: str, timeout: float = 120, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a console script of this environment (``launch``, ``trainfleet``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or REPO)


@pytest.fixture
def launch(tmp_path):
    """``launch(*args)`` runs the launch console script with logs under tmp_path."""

    def run(*args: str, timeout: float = 180, env: dict | None = None, log_dir: bool = True):
        extra = ["--log-dir", str(tmp_path / "logs")] if log_dir else []
        return run_cli("launch", *extra, *args, timeout=timeout, env=env)

    return run
