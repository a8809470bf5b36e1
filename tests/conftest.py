"""Shared fixtures. The autouse ones fail a test that leaks an environment variable,
a process group, a child process, an orphaned worker or a listening socket."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import parts

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
BIN = Path(sys.executable).parent
# Set by libraries on their own, not by the code under test: pytest for every test,
# torch._inductor the first time an optimizer imports it.
ENV_SET_BY_LIBRARIES = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}
XDIST_WORKER = "PYTEST_XDIST_WORKER"  # which runner of `pytest -n N` a process (and what it started) belongs to

# ----- two runners (scripts/test.sh: pytest -n 2 --dist loadgroup) --------------------------------
# Tests whose outcome depends on time (heartbeats, hang and straggler timers, the ledger's wall clock,
# grace periods, benchmarks) or that share something machine-wide (the SLURM cluster, network
# namespaces, sshd) run one after another on one runner ("serial"); every other test runs on the
# other runner beside them, one at a time, in any order. A module whose module-scoped fixture is
# costly is one unit, so that the fixture is made once.
# (prefixes of test ids: a folder, a file, or a test with the start of its parameters)
SERIAL = ("tests/launcher/test_elastic.py", "tests/launcher/test_hosts.py", "tests/launcher/test_two_hosts.py",
          "tests/launcher/test_diagnosis.py", "tests/launcher/test_ledger.py", "tests/launcher/test_presence.py",
          "tests/launcher/test_control_attempts.py", "tests/launcher/test_resilience.py",
          "tests/launcher/test_launch_safety.py", "tests/slurm/test_submit.py", "tests/slurm/test_cluster.py",
          "tests/test_dev_slurm.py", "tests/gpu/", "tests/bench/test_bench.py::test_interrupted_slurm_benchmark",
          *(f"tests/bench/test_bench.py::test_benchmark_smoke[{name}-" for name in
            ("slurm_startup", "hosts_startup", "elastic_recovery", "heartbeat_soak", "diagnosis_bench")))
ONE_UNIT = {"tests/engine/test_parity.py", "tests/engine/test_formats.py", "tests/engine/test_fsdp.py",
            "tests/engine/test_resume.py", "tests/launcher/test_nodes.py"}


def runner_unit(nodeid: str) -> str:
    """What one runner takes at once: "serial", a module of ONE_UNIT, or the test alone. Every test
    marked slurm, multinode or ssh is serial (tests/test_runners.py checks it)."""
    if nodeid.startswith(SERIAL):
        return "serial"
    path = nodeid.split("::", 1)[0]
    return path if path in ONE_UNIT else nodeid


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


def _orphan_workers() -> set[int]:
    """Workers (trainfleet's or torchrun's: they carry TORCHELASTIC_RUN_ID) adopted by init:
    their launcher is gone. They are not this process's children, e.g. when a test killed
    an agent whose workers run in sessions of their own. Under pytest-xdist only this runner's:
    the other runner's tests kill agents too, and their workers are orphans for a moment."""
    from trainfleet.utils.process import processes_with

    orphans = {pid for pid, parent in processes_with("TORCHELASTIC_RUN_ID").items() if parent == 1}
    return {pid for pid in orphans if _runner_of(pid) in (None, os.environ.get(XDIST_WORKER))}


def _runner_of(pid: int) -> str | None:
    """The xdist runner ``pid`` was started from (its environment's XDIST_WORKER), else None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            entries = handle.read().split(b"\0")
    except OSError:
        return None
    prefix = f"{XDIST_WORKER}=".encode()
    return next((entry[len(prefix):].decode() for entry in entries if entry.startswith(prefix)), None)


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail the test if it leaves env vars, a process group, children, orphaned workers or listeners
    behind."""
    env_before = dict(os.environ)
    listeners_before = _listening_inodes()
    orphans_before = _orphan_workers()
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
    while (_children(os.getpid()) or _orphan_workers() - orphans_before) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftover, orphans = _children(os.getpid()), _orphan_workers() - orphans_before
    if leftover:
        problems.append(f"child processes left running: {sorted(leftover)}")
    if orphans:
        problems.append(f"workers left running after their launcher died: {sorted(orphans)}")
    if leftover or orphans:
        for pid in leftover | orphans:
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
    return parts.horovod_missing() is None


# ----- optional parts: skipped where missing, a failure where scripts/test.sh requires them ----
MISSING = pytest.StashKey[str]()      # why a required part is missing: the test fails at setup
HARDWARE_SKIP = pytest.StashKey[bool]()  # a skip for hardware this machine lacks (fewer GPUs)


def _missing_part(item: pytest.Item) -> tuple[str, str] | None:
    for part in parts.PARTS:
        marker = item.get_closest_marker(part)
        if marker is None:
            continue
        reason = parts.CHECKS[part](**marker.kwargs)
        if reason is not None:
            return part, reason
    return None


def pytest_configure(config):
    """Tests send SIGINT to the processes they start. A runner started in the background (``cmd &``)
    ignores SIGINT, every child inherits that, and Python then never raises KeyboardInterrupt: give
    the children the default disposition back (a handler here is reset to the default on exec)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config):
    have = ", ".join(f"{p} {'yes' if parts.CHECKS[p]() is None else 'no'}" for p in parts.PARTS)
    required = ", ".join(sorted(parts.required())) or "none (skips allowed)"
    return f"trainfleet parts: {have}; required ({parts.REQUIRE_ENV}): {required}"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``pytest -n N --dist loadgroup``: the runners take tests by :func:`runner_unit` (xdist's own
    groups, ``xdist_group`` marks, do not work with pytest 9: it renames ``item._nodeid``, which
    pytest 9 no longer reads)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return runner_unit(nodeid)

    return Lanes(config, log)


def pytest_collection_modifyitems(config, items):
    required = parts.required()
    for item in items:
        found = _missing_part(item)
        if found is None:
            continue
        part, reason = found
        if part in required and not (part == "gpu" and parts.gpu_missing() is None):
            item.stash[MISSING] = f"{part} is required here ({parts.REQUIRE_ENV}) but missing: {reason}"
        else:
            # A missing optional part, or a GPU test that needs more devices than the machine has.
            item.stash[HARDWARE_SKIP] = True
            item.add_marker(pytest.mark.skip(reason=f"{part}: {reason}"))


def pytest_runtest_setup(item):
    if MISSING in item.stash:
        pytest.fail(item.stash[MISSING], pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under scripts/test.sh a skip is a failure, unless it is for a part not required there."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and parts.strict()) or hasattr(report, "wasxfail"):
        return
    if item.stash.get(HARDWARE_SKIP, False):  # decided at collection: an optional part, or too few GPUs
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped while {parts.REQUIRE_ENV} is set (scripts/test.sh): {reason}"


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
