"""``launch --hosts a,b[:slots]`` / ``--hostfile FILE``: one command starts every node over ssh.

Each node runs the usual agent (``trainfleet.launcher.remote``): node 0 in a child process
of this launcher when the first host is this machine, every other node through the system's
OpenSSH client (``BatchMode``, ``~/.ssh/config`` honoured, ``--ssh-opt`` added). The agent
gets its configuration as one JSON line on stdin and keeps reading stdin: a ``signal N``
line is a signal to relay, and end-of-file (this launcher or the ssh connection gone) stops
it and its workers. The agents then coordinate as on any cluster (control store, heartbeats,
fail-fast), so a failure on any host brings every host down.

No torch import here: pre-flight problems are answered in one line before anything starts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from trainfleet.launcher.config import LaunchConfig, default_log_root
from trainfleet.launcher.host_list import HostsPlan, ssh_name
from trainfleet.launcher.store_auth import new_token
from trainfleet.utils.errors import UsageError

FORWARDED_PREFIXES = ("TRAINFLEET_", "NCCL_", "GLOO_", "TORCH_", "CUDA_LAUNCH_BLOCKING")
# Paths and settings only: a secret (WANDB_API_KEY, a token) goes to other hosts only when named with --env.
FORWARDED_NAMES = ("PYTHONPATH", "OMP_NUM_THREADS", "HF_HOME")
NOT_FORWARDED = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")  # each host picks the interface to the master
DEFAULT_PORT = 29500


def host_address(name: str) -> str:
    """The address the other nodes reach ``name`` at (``user@`` and IPv6 brackets removed, resolved)."""
    host = name.rpartition("@")[2].strip("[]")
    try:
        return socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except OSError as err:
        raise UsageError(f"host {host!r} cannot be resolved ({err}).", "check the name, or give its address.") \
            from err


def is_this_machine(address: str) -> bool:
    """True when ``address`` belongs to this machine (it can be bound here)."""
    with socket.socket(_family(address)) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def forwarded_env(names: Sequence[str]) -> dict[str, str]:
    """The variables every node gets: trainfleet's, NCCL/GLOO/TORCH ones, a few common ones, and --env."""
    env = {k: v for k, v in os.environ.items()
           if (k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES) and k not in NOT_FORWARDED}
    env.update((name, os.environ[name]) for name in names)
    return env


# ----- pre-flight ---------------------------------------------------------------------------
PROBE = """
import importlib.metadata as m, json, os, socket, sys
cwd, target, module, port = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
out = {"cwd": os.path.isdir(cwd)}
for name in ("trainfleet", "torch"):
    try:
        out[name] = m.version(name)
    except Exception:
        out[name] = None
out["target"] = module or os.path.isfile(os.path.join(cwd, target))
if port != "-":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("", int(port)))
        out["port"] = True
    except OSError as err:
        out["port"] = err.strerror
print(json.dumps(out))
"""


def _probe(plan: HostsPlan, host: str, cfg: LaunchConfig, check_port: bool) -> dict[str, Any] | str:
    """What ``host`` has (versions, the script, the master port), or why it cannot be reached."""
    args = [os.getcwd(), cfg.target or "", "1" if cfg.module else "0", str(cfg.master_port) if check_port else "-"]
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-c", PROBE, *args])
    try:
        done = subprocess.run(plan.ssh(host, command), capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "did not answer over ssh within 30 s"
    if done.returncode == 255:
        said = (done.stderr.strip().splitlines() or ["no message"])[-1]
        if "Host key verification failed" in said:
            return (f"is not a known ssh host ({said}). HINT: check that it is the machine you mean, then add its "
                    f"key: ssh-keyscan {ssh_name(host).rpartition('@')[2]} >> ~/.ssh/known_hosts")
        if "Permission denied" in said:
            return f"refused the ssh login ({said}). HINT: set up key-based login, or pass the key: --ssh-opt '-i KEY'"
        return f"is unreachable over ssh ({said}). HINT: check the name and that sshd runs there"
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"cannot run {sys.executable} ({said}). HINT: install trainfleet there at the same path"
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"answered the pre-flight check with {done.stdout.strip()[:80]!r}"


def _problem(found: dict[str, Any], cfg: LaunchConfig, local: dict[str, str | None]) -> str | None:
    if not found["cwd"]:
        return f"has no folder {os.getcwd()} (the launch folder). HINT: use a path every host shares"
    for name in ("trainfleet", "torch"):
        if found[name] != local[name]:
            return (f"has {name} {found[name] or 'not installed'}, this machine {local[name]}. "
                    f"HINT: install the same {name} on every host")
    if not found["target"]:
        return f"has no script {cfg.target} in {os.getcwd()}. HINT: copy it there, or use a shared folder"
    if found.get("port", True) is not True:
        return f"cannot listen on --master-port {cfg.master_port} ({found['port']}). HINT: pick another port"
    return None


def preflight(plan: HostsPlan, cfg: LaunchConfig, local_first: bool) -> None:
    """Every remote host reachable, with the same versions, the script, and (node 0) the port.

    Raises:
        UsageError: one line naming the first host that fails, and why.
    """
    import importlib.metadata as metadata

    local = {name: _version(metadata, name) for name in ("trainfleet", "torch")}
    remote = [(k, h.name) for k, h in enumerate(plan.hosts) if k > 0 or not local_first]
    with ThreadPoolExecutor(max_workers=min(16, max(len(remote), 1))) as pool:
        found = list(pool.map(lambda item: _probe(plan, item[1], cfg, item[0] == 0), remote))
    for (_, host), result in zip(remote, found):
        problem = result if isinstance(result, str) else _problem(result, cfg, local)
        if problem is not None:
            what, _, hint = problem.partition(" HINT: ")
            raise UsageError(f"host {host} {what}.", hint + "." if hint else "")


def _version(metadata: Any, name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def free_port(address: str) -> int:
    with socket.socket(_family(address)) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


# ----- running ------------------------------------------------------------------------------
RELAYED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _relay_output(stream: Any, host: str) -> None:
    """A remote agent's own lines (its workers log to files on its host), prefixed with the host."""
    for line in stream:
        sys.stderr.write(f"[{host}] {line}")
        sys.stderr.flush()


def _start_node(plan: HostsPlan, node: int, local: bool, spec: dict[str, Any]) -> subprocess.Popen:
    """Node ``node``'s agent: a child process here, or over ssh. Its stdin stays open: EOF stops it."""
    host = plan.hosts[node].name
    agent = [sys.executable, "-m", "trainfleet.launcher.remote"]
    command = agent if local else plan.ssh(host, "exec " + " ".join(shlex.quote(a) for a in agent))
    piped = None if node == 0 else subprocess.PIPE  # node 0 (global rank 0) speaks to this terminal
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=piped, stderr=piped, text=True,
                               start_new_session=True)
    process.stdin.write(json.dumps({**spec, "config": {**spec["config"], "node_rank": node}}) + "\n")
    process.stdin.flush()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            threading.Thread(target=_relay_output, args=(stream, host), daemon=True).start()
    return process


def _check_local_port(address: str, port: int) -> None:
    with socket.socket(_family(address)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as err:
            raise UsageError(f"--master-port {port} on {address} is not available ({err.strerror}).",
                             "pick another port, or omit --master-port.") from err


def prepare(cfg: LaunchConfig, plan: HostsPlan) -> tuple[LaunchConfig, bool]:
    """The job's configuration for every node (master = the first host), and whether node 0 is here."""
    master = host_address(plan.master_addr or plan.hosts[0].name)
    local_first = is_this_machine(master)
    port = cfg.master_port or (free_port(master) if local_first else DEFAULT_PORT)
    if local_first:
        _check_local_port(master, port)
    log_dir = cfg.log_dir or str(default_log_root("/tmp") / cfg.run_id)  # the same path on every host
    # every host's agent gets this with its own node_rank
    cfg = dataclasses.replace(cfg, nodes=len(plan.hosts), role="node", node_rank=0, master_addr=master,
                              master_port=port, log_dir=log_dir, job_token=cfg.job_token or new_token())
    return cfg, local_first


def run_hosts(cfg: LaunchConfig, plan: HostsPlan) -> int:
    """Start every host's agent, relay signals to node 0, and leave nothing running anywhere.

    Returns:
        node 0's exit code, or the first non-zero one.
    """
    cfg, local_first = prepare(cfg, plan)
    preflight(plan, cfg, local_first)
    config = {**dataclasses.asdict(cfg), "cuda_devices": None}  # each host counts its own GPUs
    spec = {"config": config, "env": forwarded_env(plan.env_names), "cwd": os.getcwd()}
    processes: list[subprocess.Popen] = []
    codes: list[int | None] = [None] * len(plan.hosts)

    def relay(signum: int, _frame: Any) -> None:  # node 0's agent relays it to every node
        if processes:
            _send(processes[0], f"signal {signum}\n")

    previous = {signum: signal.signal(signum, relay) for signum in RELAYED_SIGNALS}
    try:
        for node in range(len(plan.hosts)):
            processes.append(_start_node(plan, node, node == 0 and local_first, spec))
        codes = _wait(processes, cfg.heartbeat_timeout + cfg.grace_period + 5, cfg.elastic)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop(processes, cfg.grace_period + 5)
    first = next((code for code in codes if code not in (0, None)), 0)
    return codes[0] if codes[0] not in (0, None) or cfg.elastic else first


def _send(process: subprocess.Popen, text: str) -> None:
    try:
        process.stdin.write(text)
        process.stdin.flush()
    except (OSError, ValueError):  # it has gone already
        pass


def _wait(processes: list[subprocess.Popen], linger: float, elastic: bool = False) -> list[int | None]:
    """Exit codes once every node ended, or ``linger`` s after the first failure (then None for the rest).
    An elastic job goes on without a node that left: only node 0's exit ends it."""
    failed_at = None
    while True:
        codes = [p.poll() for p in processes]
        if all(code is not None for code in codes):
            return codes
        ending = codes[0] is not None if elastic else any(code not in (0, None) for code in codes)
        if failed_at is None and ending:
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > linger:
            return codes
        time.sleep(0.1)


def _stop(processes: list[subprocess.Popen], grace: float) -> None:
    """Close every agent's stdin (it stops its workers), then kill what is left after ``grace``."""
    for process in processes:
        try:
            process.stdin.close()
        except OSError:
            pass
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
