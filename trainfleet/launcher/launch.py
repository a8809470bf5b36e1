"""Entry points of ``launch`` on this machine: in-process debug, one node agent, or
N simulated nodes. The helpers they share live below them (config, network, workers).

The launcher imports torch once and forks its workers from it (about 1.6 s to all
ranks past init for 2 gloo workers, against 3.4 s for torchrun, whose workers each
import torch themselves). Rendezvous sockets are bound before the fork and adopted by
the servers afterwards, so no other process can take a port in between.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import wait
from typing import Any

from trainfleet.engine import contract
from trainfleet.launcher import horovod
from trainfleet.launcher.agent import FORWARDED_SIGNALS, NodeAgent
from trainfleet.launcher.config import LaunchConfig, Placement, check_log_root, default_log_root, log_dir
from trainfleet.launcher.ledger import process_age
from trainfleet.launcher.network import reserve_port
from trainfleet.launcher.rendezvous import say
from trainfleet.launcher.store_auth import new_token
from trainfleet.launcher.worker_group import killpg, preload
from trainfleet.launcher.worker_process import run_target
from trainfleet.launcher.workers import worker_env
from trainfleet.utils.errors import UsageError
from trainfleet.utils.process import die_with_parent


def prepared_log_dir(cfg: LaunchConfig) -> LaunchConfig:
    """``cfg`` with its log folder decided; the default one's per-user root made (or checked) private."""
    folder = log_dir(cfg)
    if folder.parent == default_log_root():
        check_log_root(folder.parent)
    return dataclasses.replace(cfg, log_dir=str(folder))


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


def _agent_main(cfg: LaunchConfig, node_rank: int, sockets: dict[str, socket.socket], parent: int,
                origin: float) -> None:
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
        code = NodeAgent(cfg, node_rank, sockets if node_rank == 0 else None, origin=origin).run()
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
    preload(cfg.start_method)  # forked agents start with it done
    import torch.multiprocessing as mp

    sockets = reserve_rendezvous(cfg)
    _announce(cfg)
    cfg = dataclasses.replace(prepared_log_dir(cfg), master_port=sockets["control"].getsockname()[1],
                              horovod_port=sockets["horovod"].getsockname()[1] if "horovod" in sockets else None)
    # the agents fork (or spawn); forkserver applies to the workers, each agent running its own server
    context = mp.get_context("fork" if cfg.start_method == "forkserver" else cfg.start_method)
    origin = time.monotonic() - process_age()  # the job's ledger counts from this process's start
    agents = [context.Process(target=_agent_main, args=(cfg, n, sockets, os.getpid(), origin), name=f"node{n}")
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
                    codes[n] = 128 - agent.exitcode if agent.exitcode < 0 else agent.exitcode  # killed: 128+signal
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
    os.environ[contract.STRATEGY] = "single" if cfg.strategy == "ddp" else cfg.strategy
    try:
        run_target(cfg.target, list(cfg.args), cfg.module)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    return 0


def launch(cfg: LaunchConfig) -> int:
    """Run the job described by ``cfg`` from this machine; returns the exit code."""
    if cfg.debug:
        return run_in_process(cfg)
    contract.require_backend(cfg.strategy)  # a missing Horovod is bad input: say so before starting anything
    if cfg.role == "local" and not cfg.job_token:  # every node is started from here: they share a fresh one
        cfg = dataclasses.replace(cfg, job_token=new_token())
    if cfg.simulated_nodes:
        return run_simulated_nodes(cfg)
    node = cfg.node_rank or 0
    sockets = reserve_rendezvous(cfg) if node == 0 else None
    if node == 0:
        _announce(cfg)
    cfg = prepared_log_dir(cfg)
    agent = NodeAgent(cfg, node, sockets)
    code = agent.run()
    if agent.exit_hard:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
