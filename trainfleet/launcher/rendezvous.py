"""Rendezvous of a node's agent with the job, before any worker starts: connect to node 0's
control store (node 0 hosts it), claim this node's id, take the job's run id, and agree the
layout (node 0 compares every node's and starts with those that came, down to MIN for an elastic
job). Per attempt, node 0 binds the workers' rendezvous store (and Horovod's server) and
publishes their ports; the other nodes read them.

:class:`RendezvousMixin` is a base of :class:`~trainfleet.launcher.agent.NodeAgent`; it uses the
agent's ``cfg``, ``node_rank``, ``is_master``, ``sockets``, ``channel``, ``members``,
``coordinator``, ``attempt_servers`` and ``_pending``.

Values read from the store are checked before use: a run id must look like one, a layout is
compared field by field, ports must be ports, and a refusal from node 0 is shown as it is.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import time
from typing import Any

from trainfleet.engine import contract
from trainfleet.launcher import control, elastic, horovod, presence
from trainfleet.launcher.control import ControlChannel
from trainfleet.launcher.elastic import Coordinator
from trainfleet.launcher.network import reserve_port
from trainfleet.launcher.store_auth import SignedStore, looks_signed, with_token
from trainfleet.launcher.store_values import parse_count, parse_dict, parse_ports, printable
from trainfleet.utils.errors import UsageError

HEARTBEAT_INTERVAL = 0.5
RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # what a run id from the master's store may be


def say(message: str) -> None:
    """One line from the launcher on stderr."""
    print(f"launch: {message}", file=sys.stderr, flush=True)


class RendezvousMixin:
    """Connect, claim, agree (see the module's docstring)."""

    def _connect(self) -> None:
        cfg = self.cfg
        if self.is_master:
            sock = self.sockets.pop("control", None) or reserve_port(cfg.master_addr, cfg.master_port)
            port = sock.getsockname()[1]
            self.cfg = cfg = dataclasses.replace(cfg, master_port=port)
            self.server = control.connect(cfg.master_addr, port, 30, is_master=True, listen_fd=sock.detach())
        client = self._client(timeout=2.0)
        if self.is_master:
            client.set("job/run_id", cfg.run_id)
            if cfg.nodes > 1:  # node 0 learns at once when another node's agent dies (launcher/presence.py)
                self.presence = presence.PresenceServer(reserve_port(cfg.master_addr, None), client, cfg.nodes,
                                                        on_line=self.console.add if self.console is not None else None)
                self.presence.start()
                client.set("presence/port", str(self.presence.port))
        else:
            self._claim(client)  # before the first heartbeat: a duplicate must not look like the node
            self.cfg = cfg = dataclasses.replace(cfg, run_id=self._job_run_id(client))
            port = parse_count(client.get("presence/port")) if client.check(["presence/port"]) else None
            if port is not None and 0 < port < 65536:
                sock = presence.connect((cfg.master_addr, port), client, self.node_rank)
                self.presence_link = presence.LineLink(sock) if sock is not None else None  # it beats from now
        self.channel = ControlChannel(client, self.node_rank, cfg.nodes, HEARTBEAT_INTERVAL, cfg.heartbeat_timeout,
                                      master=(cfg.master_addr, cfg.master_port))
        self.channel.start()

    def _job_run_id(self, store: Any) -> str:
        """Node 0's run id, which every node's workers get (TORCHELASTIC_RUN_ID is job-wide, as
        torchrun's --rdzv-id is); checked, since it comes from the network."""
        if not wait_key(store, "job/run_id", self.cfg.rendezvous_timeout, self._check_token):
            raise UsageError(f"node {self.node_rank}: the master published no run id within "
                             f"{self.cfg.rendezvous_timeout:.0f}s.", "is node 0 a trainfleet agent of this job?")
        self._check_token(store)
        run_id = store.get("job/run_id").decode(errors="replace")
        if not RUN_ID.fullmatch(run_id):
            raise UsageError(f"node {self.node_rank}: the master's run id {run_id[:80]!r} is not one "
                             "(expected letters, digits, '.', '_' or '-').", "is node 0 a trainfleet agent?")
        return run_id

    def _check_token(self, store: Any) -> None:
        """Refuse a master that signs with another token, or that signs when this node does not
        (or the reverse): every later value would be ignored, and the node would wait in vain."""
        if isinstance(store, SignedStore):
            differs = "job/run_id" in store.rejected
        else:
            differs = store.check(["job/run_id"]) and looks_signed(store.get("job/run_id"))
        if differs:
            node = self.node_rank
            raise UsageError(f"node {node}: node 0 signs the control store with another job token than this node "
                             f"({contract.JOB_TOKEN} is {'set' if self.cfg.job_token else 'unset'} here).",
                             f"export the same {contract.JOB_TOKEN} on every node, or on none.")

    def _claim(self, store: Any) -> None:
        """Hold this node id in the job, so that a second agent started with the same
        --node-rank is refused instead of running the same ranks twice. In an elastic job it
        waits (up to the rendezvous timeout) for node 0 to drop an earlier agent of this node,
        which releases the id: an agent restarted after its node was lost takes it back."""
        cfg, node, key = self.cfg, self.node_rank, f"agent/{self.node_rank}"
        token = f"{socket.gethostname()}:{os.getpid()}"
        deadline = time.monotonic() + cfg.rendezvous_timeout
        while (holder := self._compare_set(store, key, token)) != token:
            if not cfg.elastic or time.monotonic() > deadline:
                when = f"after {cfg.rendezvous_timeout:.0f}s, " if cfg.elastic else ""
                raise UsageError(
                    f"node {node}: {when}another agent ({holder}) runs as --node-rank {node} in this job.",
                    f"give each machine its own --node-rank (0..{cfg.nodes - 1}), or stop the other agent.")
            time.sleep(0.2)

    def _compare_set(self, store: Any, key: str, token: str) -> str:
        try:
            return store.compare_set(key, "", token).decode(errors="replace")
        except RuntimeError as err:  # the master's store went away while this agent waited (the job ended)
            raise UsageError(f"node {self.node_rank}: the master at {self.cfg.master_addr}:{self.cfg.master_port} "
                             f"went away while this agent waited to join ({str(err).splitlines()[0][:120]}).",
                             "the job may have ended; check node 0's output.") from err

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
                return with_token(control.connect(cfg.master_addr, cfg.master_port, timeout), cfg.job_token,
                                  f"node {self.node_rank}")
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
        return {"nodes": cfg.nodes_spec, "gpus": cfg.procs_per_node, "strategy": cfg.strategy,
                "precision": cfg.precision, "host": socket.gethostname()}

    def _preflight(self) -> None:
        """Every node must agree on the layout; the master compares and says who differs."""
        store = self.channel.store
        store.set(f"layout/{self.node_rank}", json.dumps(self._layout()))
        timeout = self.cfg.rendezvous_timeout
        if self.is_master:
            self.members = self._gather()
            self.channel.members = self.members
            self.coordinator = Coordinator(self.cfg, self.channel, self._layout(), say)
            self.coordinator.gone = self._gone
            store.set("members/0", json.dumps(self.members))
            store.set("preflight", "ok")
            return
        if not wait_key(store, "preflight", timeout):
            raise UsageError(f"node {self.node_rank}: the master did not confirm the layout within {timeout:.0f}s.")
        answer = printable(store.get("preflight").decode(errors="replace"), 500)
        if answer != "ok":
            raise UsageError(answer)

    def _gather(self) -> list[int]:
        """Node 0: the nodes of the first attempt. Every node must come within the rendezvous
        timeout; an elastic job starts with those that came when at least MIN did."""
        cfg, store, mine = self.cfg, self.channel.store, self._layout()
        timeout = cfg.rendezvous_timeout
        deadline = time.monotonic() + timeout
        joined = [0]
        for node in range(1, cfg.nodes):
            if not wait_key(store, f"layout/{node}", deadline - time.monotonic()):
                if not cfg.elastic:
                    self._fail_preflight(f"node {node} did not join within {timeout:.0f}s.",
                                         f"start `launch --node-rank {node}` on that machine.")
                continue
            theirs = parse_dict(store.get(f"layout/{node}"))
            problem = (elastic.layout_problem(node, theirs, mine) if theirs is not None else
                       (f"node {node} sent a malformed layout.", "is every node of this job a trainfleet agent?"))
            if problem is not None:
                self._fail_preflight(*problem)
            joined.append(node)
        missing = ", ".join(str(node) for node in range(cfg.nodes) if node not in joined)
        if len(joined) < cfg.min_nodes:
            self._fail_preflight(f"only {len(joined)} of --nodes {cfg.nodes_spec} joined within {timeout:.0f}s "
                                 f"(missing: node {missing}).",
                                 "start `launch --node-rank K` on the missing machines, or lower MIN.")
        if missing:
            say(f"starting on {len(joined)} of --nodes {cfg.nodes_spec}; node {missing} did not come within "
                f"{timeout:.0f}s and may join later.")
        return joined

    def _fail_preflight(self, message: str, hint: str) -> None:
        self.channel.store.set("preflight", str(UsageError(message, hint)))
        raise UsageError(message, hint)

    # ----- each attempt's rendezvous: the workers' store (and Horovod's server) on node 0 ---------
    def _attempt_ports(self, attempt: int) -> tuple[int, int | None]:
        """Node 0 binds fresh rendezvous ports for an attempt and publishes them."""
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
        if not wait_key(store, key, self.cfg.rendezvous_timeout):
            raise UsageError(f"node {self.node_rank}: no rendezvous ports from the master for attempt {attempt}.")
        raw = store.get(key)
        ports = parse_ports(raw)
        if ports is None:
            posted = printable(raw.decode(errors="replace"), 80)
            raise UsageError(f"node {self.node_rank}: the master posted {posted!r} as the ports of attempt {attempt}.",
                             "is every node of this job a trainfleet agent?")
        return ports

    def _host_attempt_servers(self, nodes: int | None = None) -> None:
        """Node 0: serve the attempt's worker store (and Horovod's rendezvous, for ``nodes`` nodes:
        the attempt's members, by default the current ones)."""
        if not self.is_master:
            return
        pending = self._pending
        store_sock = pending["store"]
        self.attempt_servers.append(control.connect(self.cfg.master_addr, store_sock.getsockname()[1], 300,
                                                    is_master=True, listen_fd=store_sock.detach()))
        if pending["horovod"] is not None:
            self.attempt_servers.append(horovod.RendezvousService(pending["horovod"], self.cfg,
                                                                  nodes or len(self.members)))

    def _stop_attempt_servers(self) -> None:
        for server in self.attempt_servers:
            if isinstance(server, horovod.RendezvousService):
                server.stop()
        self.attempt_servers = []


def wait_key(store: Any, key: str, timeout: float, check: Any = None) -> bool:
    """True once ``key`` is in the store (looked at least once), False after ``timeout``;
    ``check(store)`` runs each time it is not (it may raise)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if store.check([key]):
                return True
            if check is not None:
                check(store)
        except RuntimeError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
