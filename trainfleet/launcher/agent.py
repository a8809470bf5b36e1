"""The agent of one node: pre-flight, attempts, whole-job fail-fast, one report.

Every node runs one agent. Node 0's agent also hosts the control store (the whole
job) and, per attempt, the workers' rendezvous store (and Horovod's server). The
agent's loop never blocks on the network: heartbeats and job state go through its
:class:`~trainfleet.launcher.control.ControlChannel` thread.

How a job fails, and how fast the last agent exits:

- a worker exits non-zero (exception, ``kill -9``, OOM): its agent sees it within
  0.1 s and posts the failure; every other agent reads it within one poll (0.5 s) and
  stops its workers;
- a worker is stopped (``kill -STOP``) for ``heartbeat_timeout``: its agent fails the job;
- an agent dies or freezes, or a link is cut: its heartbeats stop and the master (or,
  cut off from the master, the node itself) declares the peer lost after
  ``heartbeat_timeout``.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainfleet.launcher import control, horovod
from trainfleet.launcher.config import LaunchConfig
from trainfleet.launcher.control import ControlChannel, Failure
from trainfleet.launcher.workers import WorkerGroup
from trainfleet.utils.errors import UsageError

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL = 0.1
HEARTBEAT_INTERVAL = 0.5
FAILURE_GRACE = 1.0  # after a failure the survivors' state is moot: SIGKILL soon


def say(message: str) -> None:
    """One line from the launcher on stderr."""
    print(f"launch: {message}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    """How one attempt ended on this node."""

    kind: str  # "ok", "failed", "lost", "signal"
    failure: Failure | None = None
    signum: int | None = None

    @property
    def restartable(self) -> bool:
        return self.kind == "failed" and self.failure is not None and self.failure.rank is not None


class NodeAgent:
    """Runs and supervises the workers of one node, in step with the other nodes.

    Args:
        cfg: the validated launch request.
        node_rank: this node's index.
        sockets: listening sockets node 0 bound earlier (``control``); bound here when None.
        specs_for: ``specs_for(agent, attempt, port, horovod_port)`` -> the WorkerSpecs.
    """

    def __init__(self, cfg: LaunchConfig, node_rank: int, specs_for: Any,
                 sockets: dict[str, socket.socket] | None = None):
        self.cfg, self.node_rank, self.specs_for = cfg, node_rank, specs_for
        self.sockets = dict(sockets or {})
        self.is_master = node_rank == 0
        self.channel: ControlChannel | None = None
        self.server: Any = None
        self.attempt_servers: list[Any] = []
        self._pending: dict[str, socket.socket | None] = {}  # node 0: this attempt's sockets
        self.signum: int | None = None
        self.started = time.monotonic()
        self.exit_hard = False

    # ----- control plane -------------------------------------------------------------
    def _connect(self) -> None:
        from trainfleet.launcher.local import reserve_port

        cfg = self.cfg
        if self.is_master:
            sock = self.sockets.pop("control", None) or reserve_port(cfg.master_addr, cfg.master_port)
            port = sock.getsockname()[1]
            self.cfg = cfg = dataclasses.replace(cfg, master_port=port)
            self.server = control.connect(cfg.master_addr, port, 30, is_master=True, listen_fd=sock.detach())
        client = self._client(timeout=2.0)
        self.channel = ControlChannel(client, self.node_rank, cfg.nodes, HEARTBEAT_INTERVAL, cfg.heartbeat_timeout)
        self.channel.start()

    def _client(self, timeout: float) -> Any:
        """A control-store client; waits for the master up to the rendezvous timeout."""
        cfg = self.cfg
        try:
            socket.gethostbyname(cfg.master_addr)
        except OSError as err:
            raise UsageError(f"node {self.node_rank}: --master-addr {cfg.master_addr} does not resolve ({err}).",
                             "use the master's hostname or IP address as this node sees it.") from err
        deadline = time.monotonic() + cfg.rendezvous_timeout
        while True:  # a plain TCP probe first: the store's client logs every failed attempt
            try:
                socket.create_connection((cfg.master_addr, cfg.master_port), timeout=min(timeout, 1.0)).close()
                return control.connect(cfg.master_addr, cfg.master_port, timeout)
            except (OSError, RuntimeError) as err:
                if time.monotonic() > deadline:
                    reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
                    raise UsageError(
                        f"node {self.node_rank}: the master {cfg.master_addr}:{cfg.master_port} is unreachable "
                        f"after {cfg.rendezvous_timeout:.0f}s ({reason}).",
                        "start node 0 first, check --master-addr/--master-port and that the port is open.") from err
                time.sleep(0.3)

    def _layout(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"nodes": cfg.nodes, "gpus": cfg.procs_per_node, "strategy": cfg.strategy,
                "precision": cfg.precision, "host": socket.gethostname()}

    def _preflight(self) -> None:
        """Every node must agree on the layout; the master compares and says who differs."""
        store = self.channel.store
        store.set(f"layout/{self.node_rank}", json.dumps(self._layout()))
        timeout = self.cfg.rendezvous_timeout
        if self.is_master:
            mine = self._layout()
            for node in range(1, self.cfg.nodes):
                if not _wait_key(store, f"layout/{node}", timeout):
                    self._fail_preflight(f"node {node} did not join within {timeout:.0f}s.",
                                         f"start `launch --node-rank {node}` on that machine.")
                theirs = json.loads(store.get(f"layout/{node}"))
                for key in ("nodes", "gpus", "strategy", "precision"):
                    if theirs[key] != mine[key]:
                        self._fail_preflight(
                            f"node {node} ({theirs['host']}) was started with {_flag(key)} {theirs[key]} but "
                            f"node 0 ({mine['host']}) with {_flag(key)} {mine[key]}.",
                            "start every node with the same --nodes, --gpus, --strategy and --precision.")
            store.set("preflight", "ok")
            return
        if not _wait_key(store, "preflight", timeout):
            raise UsageError(f"node {self.node_rank}: the master did not confirm the layout within {timeout:.0f}s.")
        if store.get("preflight").decode() != "ok":
            raise UsageError(store.get("preflight").decode())

    def _fail_preflight(self, message: str, hint: str) -> None:
        self.channel.store.set("preflight", str(UsageError(message, hint)))
        raise UsageError(message, hint)

    # ----- attempts ------------------------------------------------------------------
    def _attempt_ports(self, attempt: int) -> tuple[int, int | None]:
        """Node 0 binds fresh rendezvous ports for an attempt and publishes them."""
        from trainfleet.launcher.local import reserve_port

        store, key = self.channel.store, f"attempt/{attempt}/ports"
        if self.is_master:
            first = {k: self.sockets.pop(k) for k in ("store", "horovod") if k in self.sockets} if attempt == 0 else {}
            store_sock = first.get("store") or reserve_port(self.cfg.master_addr, None)
            hvd_sock = None
            if self.cfg.strategy == "horovod":
                hvd_sock = first.get("horovod") or reserve_port(self.cfg.master_addr, horovod.rendezvous_port(self.cfg)
                                                                 if attempt == 0 else None)
            self._pending = {"store": store_sock, "horovod": hvd_sock}
            ports = [store_sock.getsockname()[1], hvd_sock.getsockname()[1] if hvd_sock else None]
            store.set(key, json.dumps(ports))
            return ports[0], ports[1]
        if not _wait_key(store, key, self.cfg.rendezvous_timeout):
            raise UsageError(f"node {self.node_rank}: no rendezvous ports from the master for attempt {attempt}.")
        port, hvd_port = json.loads(store.get(key))
        return port, hvd_port

    def _host_attempt_servers(self) -> None:
        if not self.is_master:
            return
        pending = self._pending
        store_sock = pending["store"]
        self.attempt_servers.append(control.connect(self.cfg.master_addr, store_sock.getsockname()[1], 300,
                                                    is_master=True, listen_fd=store_sock.detach()))
        if pending["horovod"] is not None:
            self.attempt_servers.append(horovod.RendezvousService(pending["horovod"], self.cfg))

    def _stop_attempt_servers(self) -> None:
        for server in self.attempt_servers:
            if isinstance(server, horovod.RendezvousService):
                server.stop()
        self.attempt_servers = []

    def _run_attempt(self, attempt: int) -> Outcome:
        port, hvd_port = self._attempt_ports(attempt)
        specs = self.specs_for(self, attempt, port, hvd_port)
        group = WorkerGroup(specs, self.cfg.start_method, 0 if self.is_master else None)
        outcome = Outcome("failed")  # if anything below raises
        try:
            group.start()
            self._host_attempt_servers()
            group.start_tailing()
            outcome = self._monitor(group, attempt)
        finally:
            if outcome.kind == "signal":  # the workers got the signal: give them the grace period
                group.stop(self.cfg.grace_period, terminate=False)
            else:
                group.stop(FAILURE_GRACE if outcome.kind != "ok" else self.cfg.grace_period)
            group.close()
            self._stop_attempt_servers()
        return outcome

    def _monitor(self, group: WorkerGroup, attempt: int) -> Outcome:
        channel = self.channel
        forwarded: set[tuple[str, int]] = set()
        finished = False
        while True:
            exited = group.reap(POLL)
            for origin, signum in (("local", self.signum), ("remote", channel.signal)):
                if signum is None or (origin, signum) in forwarded:
                    continue
                forwarded.add((origin, signum))
                if origin == "local":  # relay to every node; theirs forward it to their workers
                    self.signum = None
                    channel.report_signal(signum)
                    forwarded.add(("remote", signum))
                group.forward(signum)
                if signum in STOP_SIGNALS:  # the workers get the grace period in _run_attempt
                    return Outcome("signal", signum=signum)
            for worker in exited:
                if worker.exitcode != 0:
                    lines = _tail(group, worker.spec.rank)
                    failure = Failure(self.node_rank, worker.spec.rank, worker.describe_exit(), lines,
                                      worker.spec.local_rank, time.monotonic() - worker.started,
                                      _failed_at(worker.spec.error_file), _peer_error(lines))
                    channel.report_failure(failure)
                    return Outcome("failed", channel.failure or failure)
            frozen = group.frozen(self.cfg.heartbeat_timeout)
            if frozen is not None:
                failure = Failure(self.node_rank, frozen.spec.rank,
                                  f"frozen: stopped (state T) for over {self.cfg.heartbeat_timeout:.0f}s",
                                  _tail(group, frozen.spec.rank), frozen.spec.local_rank)
                channel.report_failure(failure)
                return Outcome("failed", channel.failure or failure)
            if channel.failure is not None:
                return Outcome("failed", channel.failure)
            if channel.lost is None and not self.is_master and channel.silent_for() > self.cfg.heartbeat_timeout:
                channel.lost = f"lost the master (node 0): no answer for {channel.silent_for():.1f}s"
            if channel.lost is not None:
                failure = Failure(self.node_rank, None, channel.lost)
                channel.report_failure(failure)
                return Outcome("lost", failure)
            if not group.alive() and not finished:
                finished = True
                channel.mark_done(attempt)
            if finished and channel.done_attempt >= attempt:
                return Outcome("ok")

    def _advance(self, attempt: int) -> bool:
        """After a restartable failure: wait until every node stopped, then start the next attempt."""
        store, nodes = self.channel.store, self.cfg.nodes
        self.channel.count(f"stopped/{attempt}")
        deadline = time.monotonic() + self.cfg.heartbeat_timeout * 2
        if self.is_master:
            while int(store.add(f"stopped/{attempt}", 0)) < nodes:
                if time.monotonic() > deadline or self.channel.lost:
                    return False
                time.sleep(POLL)
            store.set("job/failure", "")
            self.channel.clear_failure()
            store.set("job/attempt", str(attempt + 1))
            return True
        while self.channel.attempt <= attempt:
            if time.monotonic() > deadline or self.channel.lost:
                return False
            time.sleep(POLL)
        self.channel.clear_failure()
        return True

    # ----- the whole run -------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def run(self) -> int:
        """Pre-flight, attempts, report; returns this agent's exit code."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in FORWARDED_SIGNALS}
        try:
            self._connect()
            self._preflight()
            for attempt in range(self.cfg.max_restarts + 1):
                outcome = self._run_attempt(attempt)
                if not outcome.restartable or attempt == self.cfg.max_restarts:
                    break
                if self.is_master:
                    f = self.channel.first_failure() or outcome.failure
                    say(f"rank {f.rank} on node {f.node} failed ({f.how}); restarting every node "
                        f"(restart {attempt + 1} of {self.cfg.max_restarts}).")
                if not self._advance(attempt):
                    break
            return self._report(outcome)  # before closing: the master reads every node's record
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._close()

    def _close(self) -> None:
        if self.channel is not None:
            self.channel.leave(wait_for_all=self.is_master)
            self.channel.stop()
            self.channel.join(timeout=3.0)
            # A thread still inside a store call (a cut link) would abort the interpreter's
            # shutdown ("terminate called without an active exception"): exit hard instead.
            self.exit_hard = self.channel.is_alive()
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        self.server = None

    def _report(self, outcome: Outcome) -> int:
        if outcome.kind == "ok":
            return 0
        if outcome.kind == "signal":
            if self.is_master:
                say(f"stopped by {signal.Signals(outcome.signum).name}; logs in {self.cfg.log_dir or 'the log dir'}")
            return 128 + outcome.signum
        failure = outcome.failure
        if self.is_master and self.channel is not None:
            failure = self.channel.first_failure() or failure
        if failure is None:
            return 1
        where = (f"rank {failure.rank} (node {failure.node}, local rank {failure.local_rank})"
                 if failure.rank is not None else f"node {failure.node}")
        if self.is_master or failure.node == self.node_rank and failure.rank is None:
            after = f" after {failure.elapsed:.1f}s" if failure.elapsed is not None else ""
            say(f"{where} failed first: {failure.how}{after}; stopped the workers on every node.")
            if failure.lines:
                say("last lines of its log:")
                for line in failure.lines:
                    print(f"  | {line}", file=sys.stderr)
        else:
            say(f"node {self.node_rank}: stopping, {where} failed: {failure.how}")
        return _exit_code(failure, self.node_rank)


def _exit_code(failure: Failure, node: int) -> int:
    """Every agent exits with the failing rank's code (128 + signal when it was killed)."""
    words = failure.how.split()
    if failure.how.startswith("exit code"):
        return int(words[2])
    if failure.how.startswith("signal SIG"):
        return 128 + signal.Signals[words[1]].value
    return 1


PEER_ERRORS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
               "Connection refused", "NCCL communicator was aborted", "remote process exited")


def _peer_error(lines: list[str]) -> bool:
    """True when the log ends in an error caused by a peer going away."""
    return any(marker in line for line in lines[-5:] for marker in PEER_ERRORS)


def _failed_at(error_file: str) -> float:
    """When the worker raised (its error file's timestamp), else now."""
    try:
        return float(json.loads(Path(error_file).read_text())["timestamp"])
    except (OSError, ValueError, KeyError):
        return time.time()


def _flag(key: str) -> str:
    return {"gpus": "--gpus"}.get(key, f"--{key}")


def _tail(group: WorkerGroup, rank: int) -> list[str]:
    group.tailer.stop()
    return group.tailer.last_lines(rank)


def _wait_key(store: Any, key: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if store.check([key]):
                return True
        except RuntimeError:
            pass
        time.sleep(0.1)
    return False
