"""Entry points of ``launch`` on this machine: in-process debug, one node agent, or
N simulated nodes.

The launcher imports torch once and forks its workers from it (about 1.6 s to all
ranks past init for 2 gloo workers, against 3.4 s for torchrun, whose workers each
import torch themselves). Rendezvous sockets are bound before the fork and adopted by
the servers afterwards, so no other process can take a port in between.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from trainfleet.launcher import horovod
from trainfleet.launcher.agent import FORWARDED_SIGNALS, NodeAgent, say
from trainfleet.launcher.config import LaunchConfig
from trainfleet.launcher.devices import visible_devices_for
from trainfleet.launcher.elastic import Placement
from trainfleet.launcher.network import interface_for
from trainfleet.launcher.worker import WorkerSpec, run_target
from trainfleet.launcher.workers import PRELOAD, killpg
from trainfleet.utils.errors import UsageError
from trainfleet.utils.process import die_with_parent


def _holder_of(port: int) -> str | None:
    """``pid N (command)`` of the local process listening on ``port``, if we can tell."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
        except OSError:
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] in inodes for fd in fds):
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                return f"pid {pid} ({command[:80]})"
        except OSError:
            continue
    return None


def reserve_port(addr: str, port: int | None) -> socket.socket:
    """Bind (and listen on) a rendezvous port now; port None picks a free one.

    Raises:
        UsageError: the port is taken (naming the process holding it, e.g. a stale
            worker of an earlier run) or the address is not local.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port or 0))
        sock.listen(1024)
    except OSError as err:
        sock.close()
        if port:
            holder = _holder_of(port)
            held = f", held by {holder}" if holder else ""
            raise UsageError(f"--master-port {port} on {addr} is not available ({err.strerror}{held}).",
                             "stop that process, pick another port, or omit --master-port.") from err
        raise UsageError(f"cannot listen on --master-addr {addr} ({err.strerror}).",
                         "use an address of this host (node 0 is the master).") from err
    return sock


def worker_env(cfg: LaunchConfig, place: Placement, local_rank: int, port: int,
               horovod_port: int | None = None, attempt: int = 0) -> dict[str, str]:
    """The environment torchrun gives a worker, plus trainfleet's own (and Horovod's) settings."""
    procs = cfg.procs_per_node
    rank, world = place.index * procs + local_rank, place.nodes * procs
    env: dict[str, Any] = {
        "RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": world,
        "LOCAL_WORLD_SIZE": procs, "GROUP_RANK": place.index, "GROUP_WORLD_SIZE": place.nodes,
        "ROLE_RANK": rank, "ROLE_WORLD_SIZE": world, "ROLE_NAME": "default",
        "MASTER_ADDR": cfg.master_addr, "MASTER_PORT": port,
        "TORCHELASTIC_RUN_ID": cfg.run_id, "TORCHELASTIC_RESTART_COUNT": attempt,
        "TORCHELASTIC_MAX_RESTARTS": cfg.max_restarts,
        # Workers join the store node 0's agent hosts instead of rank 0 starting one.
        "TORCHELASTIC_USE_AGENT_STORE": "True" if not cfg.debug else "False",
        "TRAINFLEET_STRATEGY": cfg.strategy, "TRAINFLEET_PRECISION": cfg.precision,
        "TRAINFLEET_STRATEGY_OPTIONS": json.dumps(cfg.strategy_options),
        "TRAINFLEET_AMP_BACKEND": cfg.amp_backend, "TRAINFLEET_ACCELERATOR": cfg.accelerator,
        "TRAINFLEET_RUN_ID": cfg.run_id, "TRAINFLEET_NODE": place.node, "PYTHONUNBUFFERED": "1",
        # Workers write to files; this tells them whether rank 0's echo lands on a terminal.
        "TRAINFLEET_TTY": int(sys.stdout.isatty()),
    }
    if cfg.collective_timeout:
        env["TRAINFLEET_COLLECTIVE_TIMEOUT"] = cfg.collective_timeout
        if cfg.accelerator == "cuda" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
            # NCCL's watchdog would abort the worker at the timeout (SIGABRT); a blocking wait
            # raises in the script instead, where the engine names the rank and the line.
            env["TORCH_NCCL_BLOCKING_WAIT"] = 1
    if cfg.elastic:  # the engine checks the global batch against every size the job may run at
        env.update(TRAINFLEET_NODES=cfg.nodes_spec, TRAINFLEET_WORLD_CHANGED=int(place.changed),
                   TRAINFLEET_RESUME_RECORD=str(log_dir(cfg) / f"resume.attempt{attempt}.json"))
    if cfg.nodes > 1 or cfg.master_addr not in ("127.0.0.1", "localhost"):
        # gloo/NCCL otherwise pick the interface of the hostname, often 127.0.0.1.
        iface = interface_for(cfg.master_addr)
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if iface and name not in os.environ:
                env[name] = iface
    if cfg.accelerator == "cuda" and cfg.simulated_nodes:
        # Simulated nodes share this host's GPUs: node n takes its own slice, or ranks 0 and g of
        # different nodes would open the same device (NCCL: "Duplicate GPU detected").
        env["CUDA_VISIBLE_DEVICES"] = visible_devices_for(cfg.devices_per_node, start=place.node * cfg.devices_per_node)
    elif cfg.accelerator == "cuda" and cfg.procs_per_node == 1 and cfg.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices_for(cfg.devices_per_node)
    if horovod_port is not None:
        env.update(horovod.slot_env(cfg, place, local_rank, horovod_port))
    return {key: str(value) for key, value in env.items()}


def threads_per_worker(procs: int) -> int:
    """CPU threads each worker may use so the workers do not oversubscribe the cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // procs)


def log_dir(cfg: LaunchConfig) -> Path:
    return Path(cfg.log_dir or os.path.join(tempfile.gettempdir(), "trainfleet", cfg.run_id))


def worker_specs(agent: NodeAgent, attempt: int, port: int, horovod_port: int | None) -> list[WorkerSpec]:
    """The workers of ``agent``'s node for one attempt (logs: LOG_DIR/node<N>/rank<R>.log)."""
    cfg, node, place = agent.cfg, agent.node_rank, agent.placement
    procs = cfg.procs_per_node
    threads = threads_per_worker(procs)
    folder = log_dir(cfg) / f"node{node}"
    suffix = f".attempt{attempt}" if attempt else ""
    specs = []
    for local_rank in range(procs):
        env = worker_env(cfg, place, local_rank, port, horovod_port, attempt)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        rank = int(env["RANK"])
        specs.append(WorkerSpec(
            rank=rank, local_rank=local_rank, target=cfg.target, args=list(cfg.args), module=cfg.module,
            env=env, log_path=str(folder / f"rank{rank}{suffix}.log"),
            error_file=str(folder / f"rank{rank}{suffix}.error.json"), launcher_pid=os.getpid(), threads=threads))
    return specs


def reserve_rendezvous(cfg: LaunchConfig) -> dict[str, socket.socket]:
    """Node 0's listening sockets: control store (--master-port) and, for Horovod, its server."""
    sockets = {"control": reserve_port(cfg.master_addr, cfg.master_port)}
    if cfg.strategy == "horovod":
        try:
            sockets["horovod"] = reserve_port(cfg.master_addr, horovod.rendezvous_port(cfg))
        except BaseException:
            sockets["control"].close()
            raise
    return sockets


def _announce(cfg: LaunchConfig) -> None:
    """Say once that the job runs on CPU workers."""
    if cfg.accelerator != "cpu":
        return
    if cfg.strategy == "dp":
        say("no CUDA devices in use; strategy dp runs one CPU process (DataParallel passes through).")
    else:
        say(f"no CUDA devices in use; running {cfg.world_size} CPU worker(s) over gloo.")


def _agent_main(cfg: LaunchConfig, node_rank: int, sockets: dict[str, socket.socket], parent: int) -> None:
    """A simulated node: its own session, its own workers, dies with the launcher."""
    os.setsid()
    die_with_parent(parent)
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    if node_rank != 0:
        for sock in sockets.values():
            sock.close()
    code = 1
    try:
        code = NodeAgent(cfg, node_rank, worker_specs, sockets if node_rank == 0 else None).run()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_simulated_nodes(cfg: LaunchConfig) -> int:
    """``--nodes N`` on one host: N agents, each its own process tree, over loopback.

    The agents coordinate exactly as real nodes do (control store, heartbeats); this
    process only starts them, forwards signals and, as a backstop, stops the others
    if one exits non-zero.
    """
    for module in PRELOAD:
        __import__(module)
    import torch.multiprocessing as mp

    sockets = reserve_rendezvous(cfg)
    _announce(cfg)
    cfg = dataclasses.replace(cfg, master_port=sockets["control"].getsockname()[1],
                              horovod_port=sockets["horovod"].getsockname()[1] if "horovod" in sockets else None,
                              log_dir=str(log_dir(cfg)))
    context = mp.get_context(cfg.start_method)
    agents = [context.Process(target=_agent_main, args=(cfg, n, sockets, os.getpid()), name=f"node{n}")
              for n in range(cfg.nodes)]
    for agent in agents:
        agent.start()
    for sock in sockets.values():
        sock.close()
    stop: dict[str, int | None] = {"signal": None}

    def forward(signum: int, _frame: Any) -> None:
        stop["signal"] = signum
        killpg(agents[0].pid, signum)  # node 0 relays it to every node, as on real machines

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    codes: dict[int, int] = {}
    try:
        while len(codes) < len(agents):
            wait([a.sentinel for a in agents if a.exitcode is None], timeout=0.2)
            for n, agent in enumerate(agents):
                if agent.exitcode is not None and n not in codes:
                    codes[n] = agent.exitcode
            # An elastic job goes on without a node that left; node 0's exit ends it either way.
            if 0 in codes or (not cfg.elastic and any(code != 0 for code in codes.values())):
                _stop_processes(agents, cfg.heartbeat_timeout + cfg.grace_period)
    finally:
        _stop_processes(agents, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if cfg.elastic:
        return codes.get(0, 1)
    return codes.get(0, 1) if codes.get(0, 1) != 0 else next((c for c in codes.values() if c), 0)


def _stop_processes(processes: list[Any], grace: float) -> None:
    """Wait up to ``grace`` for the processes, then SIGKILL their groups and reap them."""
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(deadline - time.monotonic(), 0))
    for process in processes:
        killpg(process.pid, signal.SIGKILL)
        process.join()


def run_in_process(cfg: LaunchConfig) -> int:
    """``--debug``: run the target in this process as rank 0 of 1, so breakpoints work."""
    sock = reserve_port(cfg.master_addr, cfg.master_port)
    port = sock.getsockname()[1]
    sock.close()  # rank 0 starts the store itself in a world of one
    os.environ.update(worker_env(cfg, Placement(0, 0, 1), 0, port))
    os.environ["TRAINFLEET_STRATEGY"] = "single" if cfg.strategy == "ddp" else cfg.strategy
    try:
        run_target(cfg.target, list(cfg.args), cfg.module)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    return 0


def launch(cfg: LaunchConfig) -> int:
    """Run the job described by ``cfg`` from this machine; returns the exit code."""
    if cfg.debug:
        return run_in_process(cfg)
    if cfg.strategy == "horovod":
        from trainfleet.engine.horovod import import_horovod

        import_horovod()  # a missing Horovod is bad input: say so before starting anything
    if cfg.nodes > 1 and cfg.node_rank is None:
        return run_simulated_nodes(cfg)
    node = cfg.node_rank or 0
    sockets = reserve_rendezvous(cfg) if node == 0 else None
    if node == 0:
        _announce(cfg)
    cfg = dataclasses.replace(cfg, log_dir=str(log_dir(cfg)))
    agent = NodeAgent(cfg, node, worker_specs, sockets)
    code = agent.run()
    if agent.exit_hard:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
