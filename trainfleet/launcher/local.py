"""Start one node's workers with torch.multiprocessing and supervise them.

The agent imports torch once and forks the workers from it (about 1.4 s to all
ranks past init for 2 gloo workers, against 3.2 s when every worker imports torch
itself). It hosts the rendezvous TCPStore on node 0 from a socket it bound before
the fork, so there is no window in which another process can take the port.
When any worker fails, the others are stopped at once: SIGTERM to their process
groups, SIGKILL after the grace period.
"""
from __future__ import annotations

import collections
import datetime
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from trainfleet.launcher import horovod
from trainfleet.launcher.config import LaunchConfig
from trainfleet.launcher.devices import visible_devices_for
from trainfleet.launcher.worker import WorkerSpec, run_target, worker_main
from trainfleet.utils.errors import UsageError

log = logging.getLogger(__name__)
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PRELOAD = ("torch", "torch.distributed", "torch.nn.parallel", "trainfleet.engine.engine")
TAIL_LINES = 20


def say(message: str) -> None:
    """One line from the launcher on stderr."""
    print(f"launch: {message}", file=sys.stderr, flush=True)


def reserve_port(addr: str, port: int | None) -> socket.socket:
    """Bind (and listen on) the rendezvous port now; port None picks a free one.

    Raises:
        UsageError: the port is taken or the address is not local.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port or 0))
        sock.listen(1024)
    except OSError as err:
        sock.close()
        if port:
            raise UsageError(f"--master-port {port} on {addr} is not available ({err.strerror}).",
                             "pick another port, or omit --master-port to use a free one.") from err
        raise UsageError(f"cannot listen on --master-addr {addr} ({err.strerror}).",
                         "use an address of this host, e.g. 127.0.0.1.") from err
    return sock


@dataclass
class Worker:
    """A started worker and what the report needs about it."""

    spec: WorkerSpec
    process: Any
    started: float
    exitcode: int | None = None


class LogTailer(threading.Thread):
    """Follows every rank's log file: echoes one rank to the console, keeps each tail."""

    def __init__(self, paths: dict[int, str], console_rank: int | None, interval: float = 0.05):
        super().__init__(name="trainfleet-log-tailer", daemon=True)
        self.paths, self.console_rank, self.interval = paths, console_rank, interval
        self.tails = {rank: collections.deque(maxlen=TAIL_LINES) for rank in paths}
        self._offsets = dict.fromkeys(paths, 0)
        self._partial = dict.fromkeys(paths, "")
        self._stop_event = threading.Event()

    def _poll(self) -> None:
        for rank, path in self.paths.items():
            try:
                with open(path, "rb") as handle:
                    handle.seek(self._offsets[rank])
                    chunk = handle.read()
            except FileNotFoundError:
                continue
            if not chunk:
                continue
            self._offsets[rank] += len(chunk)
            text = chunk.decode("utf-8", "replace")
            if rank == self.console_rank:
                sys.stdout.write(text)
                sys.stdout.flush()
            lines = (self._partial[rank] + text).split("\n")
            self._partial[rank] = lines.pop()
            self.tails[rank].extend(lines)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self._poll()

    def stop(self) -> None:
        """Stop following, after one last read of every file."""
        self._stop_event.set()
        if self.is_alive():
            self.join()
        self._poll()
        for rank, rest in self._partial.items():
            if rest:
                self.tails[rank].append(rest)
                self._partial[rank] = ""

    def last_lines(self, rank: int) -> list[str]:
        return list(self.tails[rank])


def worker_env(cfg: LaunchConfig, node_rank: int, local_rank: int, port: int,
               horovod_port: int | None = None) -> dict[str, str]:
    """The environment torchrun gives a worker, plus trainfleet's own (and Horovod's) settings."""
    procs = cfg.procs_per_node
    rank = node_rank * procs + local_rank
    env = {
        "RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": cfg.world_size,
        "LOCAL_WORLD_SIZE": procs, "GROUP_RANK": node_rank, "GROUP_WORLD_SIZE": cfg.nodes,
        "ROLE_RANK": rank, "ROLE_WORLD_SIZE": cfg.world_size, "ROLE_NAME": "default",
        "MASTER_ADDR": cfg.master_addr, "MASTER_PORT": port,
        "TORCHELASTIC_RUN_ID": cfg.run_id, "TORCHELASTIC_RESTART_COUNT": 0,
        "TORCHELASTIC_MAX_RESTARTS": 0,
        # Workers join the store this agent hosts instead of rank 0 starting one.
        "TORCHELASTIC_USE_AGENT_STORE": "True" if not cfg.debug else "False",
        "TRAINFLEET_STRATEGY": cfg.strategy, "TRAINFLEET_PRECISION": cfg.precision,
        "TRAINFLEET_AMP_BACKEND": cfg.amp_backend,
        "TRAINFLEET_ACCELERATOR": cfg.accelerator, "TRAINFLEET_RUN_ID": cfg.run_id,
        "PYTHONUNBUFFERED": "1",
        # Workers write to files; this tells them whether rank 0's echo lands on a terminal.
        "TRAINFLEET_TTY": int(sys.stdout.isatty()),
    }
    if cfg.accelerator == "cuda" and cfg.procs_per_node == 1 and cfg.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices_for(cfg.devices_per_node)
    if horovod_port is not None:
        env.update(horovod.slot_env(cfg, node_rank, local_rank, horovod_port))
    return {key: str(value) for key, value in env.items()}


def threads_per_worker(procs: int) -> int:
    """CPU threads each worker may use so the workers do not oversubscribe the cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // procs)


class LocalAgent:
    """Runs and supervises the workers of one node.

    Args:
        cfg: the validated launch request.
        node_rank: this node's index (0 on a single node).
    """

    def __init__(self, cfg: LaunchConfig, node_rank: int = 0, sockets: dict[str, socket.socket] | None = None):
        self.cfg, self.node_rank = cfg, node_rank
        base = cfg.log_dir or os.path.join(tempfile.gettempdir(), "trainfleet", cfg.run_id)
        self.log_dir = Path(base)
        self.workers: list[Worker] = []
        self._signal: int | None = None
        self._store: Any = None
        self._rendezvous: horovod.RendezvousService | None = None
        self._sockets: dict[str, socket.socket] = dict(sockets or {})

    # ----- setup ---------------------------------------------------------------------
    def _announce(self) -> None:
        """Say once, on node 0, that the job runs on CPU workers."""
        if self.cfg.accelerator != "cpu" or self.node_rank != 0:
            return
        if self.cfg.strategy == "dp":
            say("no CUDA devices in use; strategy dp runs one CPU process (DataParallel passes through).")
        else:
            say(f"no CUDA devices in use; running {self.cfg.world_size} CPU worker(s) over gloo.")

    def _specs(self, port: int, horovod_port: int | None) -> list[WorkerSpec]:
        procs = self.cfg.procs_per_node
        threads = threads_per_worker(procs)
        specs = []
        for local_rank in range(procs):
            env = worker_env(self.cfg, self.node_rank, local_rank, port, horovod_port)
            env.setdefault("OMP_NUM_THREADS", str(threads))
            rank = int(env["RANK"])
            folder = self.log_dir / f"node{self.node_rank}"
            specs.append(WorkerSpec(
                rank=rank, local_rank=local_rank, target=self.cfg.target, args=list(self.cfg.args),
                module=self.cfg.module, env=env, log_path=str(folder / f"rank{rank}.log"),
                error_file=str(folder / f"rank{rank}.error.json"), launcher_pid=os.getpid(),
                threads=threads))
        return specs

    def _start(self, specs: list[WorkerSpec]) -> None:
        for module in PRELOAD:
            __import__(module)
        import torch.multiprocessing as mp

        context = mp.get_context(self.cfg.start_method)
        for spec in specs:
            Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
            Path(spec.log_path).write_bytes(b"")
            process = context.Process(target=worker_main, args=(spec,), name=f"rank{spec.rank}")
            process.start()
            self.workers.append(Worker(spec, process, time.monotonic()))

    def _host_store(self, sock: socket.socket) -> None:
        import torch.distributed as dist

        port = sock.getsockname()[1]
        self._store = dist.TCPStore(
            self.cfg.master_addr, port, None, True, datetime.timedelta(seconds=300),
            wait_for_workers=False, master_listen_fd=sock.detach(), use_libuv=True)

    # ----- signals -------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signum
        for worker in self.workers:
            _killpg(worker.process.pid, signum)

    def _install_signal_handlers(self) -> dict[int, Any]:
        return {signum: signal.signal(signum, self._on_signal) for signum in FORWARDED_SIGNALS}

    # ----- supervision ---------------------------------------------------------------
    def _alive(self) -> list[Worker]:
        return [w for w in self.workers if w.exitcode is None]

    def _reap(self, timeout: float) -> list[Worker]:
        """Wait up to ``timeout`` for exits; return the workers that just exited."""
        alive = self._alive()
        if not alive:
            return []
        ready = set(wait([w.process.sentinel for w in alive], timeout=timeout))
        done = []
        for worker in alive:
            if worker.process.sentinel in ready:
                worker.process.join()
                worker.exitcode = worker.process.exitcode
                done.append(worker)
        return done

    def _monitor(self) -> Worker | None:
        """Wait until every worker exited or one failed; return the first failure."""
        while self._alive():
            exited = self._reap(timeout=0.1)
            if self._signal in STOP_SIGNALS:  # exits caused by a forwarded stop are not failures
                return None
            for worker in exited:
                if worker.exitcode != 0:
                    return worker
        return None

    def stop_all(self, grace: float, terminate: bool = True) -> None:
        """SIGTERM every worker's process group, SIGKILL whatever outlives ``grace``.

        With ``terminate`` False the workers already got a signal (a forwarded
        SIGINT/SIGTERM) and are only given the grace period to finish.
        """
        if terminate:
            for worker in self._alive():
                _killpg(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._alive() and time.monotonic() < deadline:
            self._reap(timeout=min(0.05, max(deadline - time.monotonic(), 0)))
        for worker in self._alive():
            _killpg(worker.process.pid, signal.SIGKILL)
        while self._alive():
            self._reap(timeout=1.0)
        for worker in self.workers:  # grandchildren left in an exited worker's group
            _killpg(worker.process.pid, signal.SIGKILL)

    def _reserve(self) -> tuple[int, int | None]:
        """Bind the rendezvous ports on node 0 (held until the servers adopt them)."""
        if self.node_rank == 0 and not self._sockets:
            self._sockets = reserve_rendezvous(self.cfg)
        port = self.cfg.master_port or 0
        hvd_port = horovod.rendezvous_port(self.cfg) if self.cfg.strategy == "horovod" else None
        if "store" in self._sockets:
            port = self._sockets["store"].getsockname()[1]
        if "horovod" in self._sockets:
            hvd_port = self._sockets["horovod"].getsockname()[1]
        return port, hvd_port

    def _start_servers(self) -> None:
        """After the fork: the TCPStore and, for Horovod, its rendezvous server adopt their sockets."""
        if "store" in self._sockets:
            self._host_store(self._sockets.pop("store"))
        if "horovod" in self._sockets:
            self._rendezvous = horovod.RendezvousService(self._sockets.pop("horovod"), self.cfg)

    def _stop_servers(self) -> None:
        if self._rendezvous is not None:
            self._rendezvous.stop()
            self._rendezvous = None
        self._store = None
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def run(self) -> int:
        """Start the workers, supervise them, and return the launcher's exit code."""
        if self.cfg.strategy == "horovod":
            from trainfleet.engine.horovod import import_horovod

            import_horovod()  # a missing Horovod is bad input: say so before starting anything
        port, hvd_port = self._reserve()
        self._announce()
        specs = self._specs(port, hvd_port)
        console = 0 if self.node_rank == 0 else None
        tailer = LogTailer({s.rank: s.log_path for s in specs}, console)
        previous = {}
        failure = None
        try:
            self._start(specs)
            self._start_servers()
            previous = self._install_signal_handlers()
            tailer.start()
            failure = self._monitor()
        finally:
            self.stop_all(self.cfg.grace_period, terminate=self._signal not in STOP_SIGNALS)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            tailer.stop()
            self._stop_servers()
        return self._report(failure, tailer)

    def _report(self, failure: Worker | None, tailer: LogTailer) -> int:
        if failure is not None:
            code = failure.exitcode
            how = f"exit code {code}" if code > 0 else f"signal {signal.Signals(-code).name}"
            elapsed = time.monotonic() - failure.started
            say(f"rank {failure.spec.rank} (node {self.node_rank}, local rank {failure.spec.local_rank}) "
                f"failed first: {how} after {elapsed:.1f}s; stopped the other workers.")
            say(f"last lines of {failure.spec.log_path}:")
            for line in tailer.last_lines(failure.spec.rank):
                print(f"  | {line}", file=sys.stderr)
            return code if code > 0 else 128 - code
        if self._signal is not None:
            say(f"stopped by {signal.Signals(self._signal).name}; logs in {self.log_dir}")
            return 128 + self._signal
        return 0


def reserve_rendezvous(cfg: LaunchConfig) -> dict[str, socket.socket]:
    """Node 0's listening sockets: the TCPStore's and, for Horovod, its rendezvous server's."""
    sockets = {"store": reserve_port(cfg.master_addr, cfg.master_port)}
    if cfg.strategy == "horovod":
        try:
            sockets["horovod"] = reserve_port(cfg.master_addr, horovod.rendezvous_port(cfg))
        except BaseException:
            sockets["store"].close()
            raise
    return sockets


def _agent_main(cfg: LaunchConfig, node_rank: int, sockets: dict[str, socket.socket], parent: int) -> None:
    """A simulated node: its own session, its own workers, dies with the launcher."""
    from trainfleet.launcher.worker import _die_with_parent

    os.setsid()
    _die_with_parent(parent)
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    mine = sockets if node_rank == 0 else {}
    for sock in sockets.values():
        if node_rank != 0:
            sock.close()
    code = 1
    try:
        code = LocalAgent(cfg, node_rank, mine).run()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_simulated_nodes(cfg: LaunchConfig) -> int:
    """``--nodes N`` on one host: N agents, each its own process tree, over loopback.

    The launcher reserves node 0's ports, forks one agent per node and supervises
    them: when one exits non-zero the others are stopped (SIGTERM, then SIGKILL after
    the grace period), and the launcher exits with the first failing agent's code.
    """
    import dataclasses

    for module in PRELOAD:
        __import__(module)
    import torch.multiprocessing as mp

    sockets = reserve_rendezvous(cfg)
    cfg = dataclasses.replace(cfg, master_port=sockets["store"].getsockname()[1],
                              horovod_port=sockets["horovod"].getsockname()[1] if "horovod" in sockets else None)
    context = mp.get_context(cfg.start_method)
    agents = [context.Process(target=_agent_main, args=(cfg, n, sockets, os.getpid()), name=f"node{n}")
              for n in range(cfg.nodes)]
    for agent in agents:
        agent.start()
    for sock in sockets.values():
        sock.close()
    stop = {"signal": None}

    def forward(signum: int, _frame: Any) -> None:
        stop["signal"] = signum
        for agent in agents:
            _killpg(agent.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    first_failure = None
    try:
        alive = list(agents)
        while alive and first_failure is None:
            wait([a.sentinel for a in alive], timeout=0.1)
            for agent in [a for a in alive if a.exitcode is not None]:
                alive.remove(agent)
                if agent.exitcode != 0 and stop["signal"] is None:
                    first_failure = agent
        if first_failure is not None:
            say(f"{first_failure.name} failed (exit code {first_failure.exitcode}); stopping the other nodes.")
    finally:
        _stop_processes(agents, cfg.grace_period)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if first_failure is not None:
        return first_failure.exitcode if first_failure.exitcode > 0 else 128 - first_failure.exitcode
    if stop["signal"] is not None:
        return 128 + stop["signal"]
    return 0


def _stop_processes(processes: list[Any], grace: float) -> None:
    """SIGTERM the groups of the processes still running, SIGKILL after ``grace``, reap all."""
    for process in processes:
        if process.exitcode is None:
            _killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(deadline - time.monotonic(), 0))
    for process in processes:
        _killpg(process.pid, signal.SIGKILL)
        process.join()


def _killpg(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def run_in_process(cfg: LaunchConfig) -> int:
    """``--debug``: run the target in this process as rank 0 of 1, so breakpoints work."""
    sock = reserve_port(cfg.master_addr, cfg.master_port)
    port = sock.getsockname()[1]
    sock.close()  # rank 0 starts the store itself in a world of one
    os.environ.update(worker_env(cfg, 0, 0, port))
    os.environ["TRAINFLEET_STRATEGY"] = "single" if cfg.strategy == "ddp" else cfg.strategy
    try:
        run_target(cfg.target, list(cfg.args), cfg.module)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    return 0


def launch(cfg: LaunchConfig) -> int:
    """Run the job described by ``cfg`` on this machine; returns the exit code."""
    if cfg.debug:
        return run_in_process(cfg)
    if cfg.nodes > 1 and cfg.node_rank is None:
        return run_simulated_nodes(cfg)
    return LocalAgent(cfg, node_rank=cfg.node_rank or 0).run()
