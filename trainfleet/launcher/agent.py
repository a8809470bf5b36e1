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

An elastic job (``--nodes MIN:MAX``) goes on instead, on the nodes left: see
:mod:`trainfleet.launcher.elastic`.
"""
from __future__ import annotations

import json
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from trainfleet.launcher import elastic, in_place
from trainfleet.launcher.config import LaunchConfig, Placement, log_dir, placement
from trainfleet.launcher.console import ConsoleMerger
from trainfleet.launcher.control import ControlChannel
from trainfleet.launcher.diagnosis import AttemptDiagnosis
from trainfleet.launcher.elastic import Coordinator
from trainfleet.launcher.ledger import Ledger, job_id
from trainfleet.launcher.rendezvous import RendezvousMixin, say
from trainfleet.launcher.store_values import Failure, failed_at, parse_count, parse_members, peer_error
from trainfleet.launcher.worker_group import WorkerGroup, exit_reason, preload
from trainfleet.launcher.workers import worker_env, worker_specs
from trainfleet.utils.errors import UsageError
from trainfleet.utils.ledger_file import table as ledger_table

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL = 0.1
SIBLING_WAIT = 0.3  # seconds a 'connection reset' failure waits for the sibling that caused it
FAILURE_GRACE = 1.0  # after a failure the survivors' state is moot: SIGKILL soon


class StoppedEarly(Exception):
    """SIGINT/SIGTERM during pre-flight or rendezvous."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass
class Outcome:
    """How one attempt ended on this node."""

    kind: str  # "ok", "failed", "lost", "signal", "resize" (nodes join), "behind" (the job moved on),
    # "in place" (a node was lost; the survivors' workers wait for their new places: launcher/in_place.py),
    # "called off" (a joining node: node 0 gave its join in place up; every node restarts: NodeAgent._rejoin)
    failure: Failure | None = None
    signum: int | None = None


class NodeAgent(RendezvousMixin):
    """Runs and supervises the workers of one node, in step with the other nodes.

    Args:
        cfg: the validated launch request.
        node_rank: this node's index.
        sockets: listening sockets node 0 bound earlier (``control``); bound here when None.
        origin: when the job started (``time.monotonic()``), if before this process.
    """

    def __init__(self, cfg: LaunchConfig, node_rank: int, sockets: dict[str, socket.socket] | None = None,
                 origin: float | None = None):
        self.cfg, self.node_rank = cfg, node_rank
        self.sockets = dict(sockets or {})
        self.is_master = node_rank == 0
        self.channel: ControlChannel | None = None
        self.server: Any = None
        self.attempt_servers: list[Any] = []
        self._pending: dict[str, socket.socket | None] = {}  # node 0: this attempt's sockets
        self.signum: int | None = None
        self.started = time.monotonic()
        self.exit_hard = False
        self.members: list[int] = list(range(cfg.nodes))
        self.placement = Placement(node_rank, node_rank, cfg.nodes)
        self.coordinator: Coordinator | None = None  # node 0: decides who is in each attempt
        self.ended: str | None = None  # why an elastic job ended here (for the report)
        self.stopped_early = False  # a stop signal came during pre-flight or rendezvous
        self.diagnosis: AttemptDiagnosis | None = None  # this attempt's hang/desync/straggler watch
        self.timings: list[str] = []  # node 0: the last attempt's per-rank step times
        self.shown: tuple | None = None  # node 0: the diagnosis report it printed as it happened
        self.attempt_now = 0  # the attempt this node's workers are in (in-place recovery moves it on)
        self._said: set[str] = set()  # in-place keys this node posted already
        self.join_in_place: int | None = None  # a joining node: the attempt its workers join the running ones in
        self.joined_in: dict[int, list[int]] = {}  # node 0: the nodes that joined each in-place attempt
        self._join: dict[str, Any] | None = None  # node 0: a join in place being prepared (_prepare_join)
        self.told_done: tuple[int, ...] = ()  # node 0: joiners told the job ended before they joined
        self.presence: Any = None  # node 0: who is connected (launcher/presence.py)
        self.presence_link: Any = None  # another node: its connection to node 0's presence server
        # node 0: where the wall time went, from ``origin`` (time.monotonic() at the launcher's start) or this
        # process's start
        self.ledger = Ledger(log_dir(cfg), job_id(), origin) if self.is_master else None
        # node 0: every rank's lines, merged (launcher/console.py); another node sends its ranks' lines there
        self.console = ConsoleMerger(cfg.nodes * cfg.devices_per_node) if (
            self.is_master and cfg.console == "merged") else None

    # ----- control plane -------------------------------------------------------------
    def _enter(self, attempt: int, members: list[int]) -> int:
        """Take this node's place among ``members`` for ``attempt``."""
        previous = self.members if attempt else None
        self.members = members
        self.channel.members = members
        self.placement = placement(members, self.node_rank, previous)
        self.channel.begin_attempt(attempt)
        return attempt

    def _first_attempt(self) -> int:
        """0, or for a node joining a running elastic job the first attempt that takes it."""
        if self.is_master:
            return self._enter(0, self.members)
        store, node = self.channel.store, self.node_rank
        attempt = (parse_count(store.get("job/attempt")) or 0) if store.check(["job/attempt"]) else 0
        members = parse_members(store.get(f"members/{attempt}"), self.cfg.nodes)
        if members is None:
            raise UsageError(f"node {node}: the master posted no valid members for attempt {attempt}.",
                             "is every node of this job a trainfleet agent?")
        if node in members:
            return self._enter(attempt, members)
        if not self.cfg.elastic:
            raise UsageError(f"node {node}: the job already runs without it.", "start every node together.")
        say(f"node {node}: asking to join the running job (attempt {attempt}, nodes {members}).")
        latest, members, in_place_join = elastic.wait_to_join(self.channel, node, self._layout(),
                                                              self.cfg.rendezvous_timeout)
        if in_place_join:
            self.join_in_place = self.channel.joining = latest
            say(f"node {node}: joining attempt {latest} in place (nodes {members}): the state comes from the "
                "peers' memory.")
        return self._enter(latest, members)

    # ----- attempts ------------------------------------------------------------------
    def _run_attempt(self, attempt: int) -> Outcome:
        self.attempt_now = attempt
        port, hvd_port = self._attempt_ports(attempt)
        specs = worker_specs(self, attempt, port, hvd_port)
        group = WorkerGroup(specs, self.cfg.start_method, 0 if self.is_master else None, self._line_sink(specs))
        outcome = Outcome("failed")  # if anything below raises
        self.diagnosis = AttemptDiagnosis(self.channel, specs, self.node_rank, attempt, self.cfg.hang_timeout,
                                          socket.gethostname(), say, rollback=self.cfg.on_nan == "rollback")
        if self.is_master:
            self.diagnosis.timings_folder = log_dir(self.cfg)
        if self.ledger is not None:
            self.ledger.begin_attempt()
        try:
            in_place.clear(specs)
            group.start()
            self._host_attempt_servers()
            group.start_tailing()
            outcome = self._monitor(group, attempt)
            while outcome.kind == "in place":  # the same workers, in the next attempt
                attempt = self._go_in_place(group, attempt)
                outcome = self._monitor(group, attempt) if attempt is not None else Outcome(
                    "failed", self.channel.failure or Failure(self.node_rank, None, "in-place recovery failed"))
                attempt = attempt if attempt is not None else self.attempt_now
        finally:
            if self.ledger is not None:
                self._watch_ledger(fresh=True)
                self.ledger.end_attempt(outcome.kind, itemised=bool(self.diagnosis.watch.records))
            if outcome.kind == "signal":  # the workers got the signal: give them the grace period
                group.stop(self.cfg.grace_period, terminate=False)
            else:
                group.stop(FAILURE_GRACE if outcome.kind != "ok" else self.cfg.grace_period)
            group.close()
            if self.console is not None:
                self.console.flush(final=True)  # this attempt's lines before the report or the next attempt's
            if self.ledger is not None and outcome.kind not in ("ok", "signal"):
                self.ledger.begin("restart")  # until the next attempt's workers start (or the report)
            self._stop_attempt_servers()
            self._note_timings()
            self.diagnosis.close()
        return outcome

    def _monitor(self, group: WorkerGroup, attempt: int) -> Outcome:
        forwarded: set[tuple[str, int]] = set()
        finished = False
        resumed = attempt == 0 or not self.cfg.elastic or not self.is_master
        grow_asked: float | None = None
        while True:
            exited = group.reap(POLL)
            outcome = (self._relay_signals(group, forwarded, attempt) or self._check_workers(group, exited, attempt)
                       or self._check_in_place(group, attempt) or self._check_job(attempt) or self._diagnose(group))
            if outcome is not None:
                return outcome
            self._watch_ledger()
            if not resumed:  # node 0 of an elastic job: say where rank 0 resumed, once it has
                resumed = self.coordinator.note_resume(attempt)
            if self.coordinator is not None and grow_asked is None and (self.channel.joiners or self._join) \
                    and self.channel.watch_in_place and self.cfg.join == "in-place" \
                    and in_place.can_take_joiners([w.spec for w in group.workers]):  # (files looked at only then)
                if self._prepare_join(attempt, self.coordinator.pending(in_place=True)):
                    return Outcome("in place")
            elif self.coordinator is not None and grow_asked is None and self.coordinator.pending():
                grow_asked = time.monotonic()
                self.channel.report_signal(signal.SIGUSR1, attempt)  # every node's workers: checkpoint and return
                forwarded.add(("remote", signal.SIGUSR1))
                group.forward(signal.SIGUSR1)
            if grow_asked is not None and time.monotonic() - grow_asked > elastic.GROW_WAIT and group.alive():
                failure = Failure(0, None, f"stopped the workers for a node to join: they did not return within "
                                           f"{elastic.GROW_WAIT:.0f}s of SIGUSR1")
                self.channel.report_failure(failure)
                return Outcome("resize", failure)
            if not group.alive() and not finished:
                finished = True
                self.diagnosis.post_final(set())  # sent before "done": node 0 reads both in one poll
                self.channel.mark_done(attempt)
            outcome = self._finished(attempt, resized=grow_asked is not None) if finished else None
            if outcome is not None:
                return outcome

    def _relay_signals(self, group: WorkerGroup, forwarded: set[tuple[str, int]], attempt: int) -> Outcome | None:
        """Pass this agent's signals to every node (the master's relay) and to this node's workers.
        A stop signal to a node of an elastic job other than node 0 takes only that node out."""
        channel = self.channel
        relayed = channel.signal if channel.signal_attempt == attempt else None  # not one for an earlier attempt
        for origin, signum in (("local", self.signum), ("remote", relayed)):
            if signum is None or (origin, signum) in forwarded:
                continue
            forwarded.add((origin, signum))
            if origin == "local":
                self.signum = None
                if not (self.cfg.elastic and not self.is_master and signum in STOP_SIGNALS):
                    self.channel.report_signal(signum, attempt)  # every node forwards it to its workers
                    forwarded.add(("remote", signum))
            group.forward(signum)
            if signum in STOP_SIGNALS:  # the workers get the grace period in _run_attempt
                return Outcome("signal", signum=signum)
        return None

    def _check_workers(self, group: WorkerGroup, exited: list[Any], attempt: int) -> Outcome | None:
        """A worker of this node exited non-zero or is frozen: the attempt fails everywhere."""
        failures = [self._failure(group, w) for w in exited if w.exitcode != 0]
        if failures and self.join_in_place == attempt and self._job_done(attempt):
            return Outcome("ok")  # the job ended before they joined: they failed as node 0 closed their store
        if failures and self.join_in_place == attempt and self._called_off(attempt):
            return Outcome("called off")  # (not a failure: the restart must not inherit it)
        if failures and all(f.secondary for f in failures):  # the peer it lost may be a sibling reaped a moment later
            failures += [self._failure(group, w) for w in group.reap(SIBLING_WAIT) if w.exitcode != 0]
        if failures:  # reaped together: a rank killed outright beats the peer that lost its connection to it
            failure = min(failures, key=lambda f: (f.secondary, f.at))
            self.channel.report_failure(failure)
            return Outcome("failed", self.channel.failure or failure)
        frozen = group.frozen(self.cfg.heartbeat_timeout)
        if frozen is not None:
            failure = Failure(self.node_rank, frozen.spec.rank,
                              f"frozen: stopped (state T) for over {self.cfg.heartbeat_timeout:.0f}s",
                              _tail(group, frozen.spec.rank), frozen.spec.local_rank)
            self.channel.report_failure(failure)
            return Outcome("failed", self.channel.failure or failure)
        return None

    def _diagnose(self, group: WorkerGroup) -> Outcome | None:
        """Every worker alive and the job still wrong: hung, or out of step (launcher/diagnosis.py)."""
        failure = self.diagnosis.check({w.spec.rank for w in group.alive()})
        if failure is None:
            return None
        if self.is_master:  # said now, not after the teardown: the user learns it in seconds
            say(f"stopping the job: {failure.how}")
            for line in failure.lines:
                print(f"  | {line}", file=sys.stderr, flush=True)
            self.shown = (failure.rank, failure.how)
        self.channel.report_failure(failure)
        return Outcome("failed", self.channel.failure or failure)

    def _line_sink(self, specs: list[Any]) -> Any:
        """Where this node's workers' complete lines go for the merged console (None: nowhere)."""
        if self.console is not None:
            self.console.set_world(int(specs[0].env.get("WORLD_SIZE", 1)) if specs else 1)
            if self.console.ident is None:
                self.console.start()
            return self.console.add
        if self.cfg.console != "merged" or self.presence_link is None:
            return None
        return self.presence_link.send

    def _watch_ledger(self, fresh: bool = False) -> None:
        """Node 0: rank 0's account from its progress record (launcher/ledger.py): as this poll's
        diagnosis read it, or ``fresh`` (the attempt just ended)."""
        if self.ledger is None or self.diagnosis is None:
            return
        watch = self.diagnosis.watch
        snap = watch.read(0) if fresh else watch.snapshots.get(0)
        if snap is not None:
            self.ledger.watch(snap.account)

    def _note_timings(self) -> None:
        """Node 0: every rank's step time by phase, kept beside the logs (and printed by _report)."""
        self.timings = self.diagnosis.final_lines()
        self.diagnosis.write_timings()

    def _failure(self, group: WorkerGroup, worker: Any) -> Failure:
        lines = _tail(group, worker.spec.rank)
        return Failure(self.node_rank, worker.spec.rank, worker.describe_exit(), lines, worker.spec.local_rank,
                       time.monotonic() - worker.started, failed_at(worker.spec.error_file), peer_error(lines),
                       exit_reason(lines))

    def _check_job(self, attempt: int) -> Outcome | None:
        """The rest of the job: a failure elsewhere, a lost node or master, the job moving on."""
        channel = self.channel
        if channel.failure is not None:
            return Outcome("failed", channel.failure)
        if not channel.is_alive():  # it keeps going through errors; gone means something killed it
            failure = Failure(self.node_rank, None, "the agent's control thread stopped")
            channel.report_failure(failure)
            return Outcome("lost", failure)
        if not self.is_master and (channel.attempt > attempt or channel.ended is not None):
            return Outcome("behind")
        if self.join_in_place == attempt and channel.done_attempt >= attempt:  # the job ended without the joiners
            return Outcome("ok")
        if self.join_in_place == attempt and channel.join_called_off == attempt:  # a member lost meanwhile
            return Outcome("called off")
        if self.is_master:
            if channel.watch_in_place:  # the in-place check owns a lost node: it may have looked a moment before
                return None             # the node was gone, and the next poll's look goes in place
            lost = next(((n, why) for n, why in sorted(self._gone().items()) if n in self.members), None)
            if lost is not None:
                failure = Failure(lost[0], None, f"lost node {lost[0]}: {lost[1]}")
                channel.report_failure(failure)
                return Outcome("lost", failure)
            return None
        if channel.lost is None and channel.silent_for() > self.cfg.heartbeat_timeout:
            channel.lost = f"lost the master (node 0): no answer for {channel.silent_for():.1f}s"
        if channel.lost is not None:
            failure = Failure(self.node_rank, None, channel.lost)
            channel.report_failure(failure)
            return Outcome("lost", failure)
        return None

    def _called_off(self, attempt: int) -> bool:
        """Whether node 0 called this joining node's join in place off (asked now, as _job_done)."""
        if self.channel.join_called_off == attempt:
            return True
        try:
            return self.channel.store.check([f"joinoff/{attempt}"])
        except RuntimeError:
            return False

    def _job_done(self, attempt: int) -> bool:
        """Whether node 0 said the job is done in ``attempt`` (asked now: the control thread reads it a
        poll later)."""
        if self.channel.done_attempt >= attempt:
            return True
        try:
            return (parse_count(self.channel.store.get("job/done")) or -1) >= attempt \
                if self.channel.store.check(["job/done"]) else False
        except RuntimeError:  # node 0's store already gone
            return False

    def _finished(self, attempt: int, resized: bool = False) -> Outcome | None:
        """This node's workers all exited 0: the attempt is over once every member's are. Workers
        that stopped because node 0 asked them to (``resized``: a node asked to join) did not finish
        the job, even when the joiner went away meanwhile: another attempt follows, never done."""
        channel = self.channel
        if not self.is_master:
            return Outcome("ok") if channel.done_attempt >= attempt else None
        if len(channel.done_nodes) < len(self.members):
            joining = self.joined_in.get(attempt, [])
            if not joining or any(node not in channel.done_nodes for node in self.members if node not in joining):
                return None
            # the survivors ran the script to its end before they moved to the group with the joiners (the
            # join was decided after their last should_stop): the job is done; the joiners' workers are stopped
            _finished_before(joining)
        elif self._join is not None and not resized:
            # the survivors ran the script to its end while a join in place was being prepared: the job is done.
            # Restarting it for the joiners would leave their workers waiting in the prepared attempt's store.
            # Told done in that attempt, the joiners stop their workers (_check_job) and end too.
            prepared, self._join = self._join, None
            self.coordinator.forget_joiners(prepared["joiners"])
            self.told_done = tuple(prepared["joiners"])  # node 0 keeps its store up until they read it
            _finished_before(prepared["joiners"])
            channel.post("job/done", str(prepared["attempt"]))
            return Outcome("ok")
        if self.coordinator.pending() or resized:
            return Outcome("resize")  # they stopped for the joiners (or finished): the next attempt takes them
        channel.post("job/done", str(attempt))
        return Outcome("ok")

    # ----- in-place recovery (launcher/in_place.py) ------------------------------------------
    def _gone(self) -> dict[int, str]:
        """Node 0: the nodes lost, and why: silent for --heartbeat-timeout, or, at once, a closed
        connection to node 0's presence server (a killed agent's kernel closes it)."""
        closed = dict(self.presence.gone) if self.presence is not None else {}
        gone = {}
        for node in closed:  # a node that said it was leaving closes its connection too
            try:
                left = self.channel.store.check([f"left/{node}"])
            except RuntimeError:
                left = False
            gone[node] = "left the job" if left else "its agent's connection closed"
        if self.presence is not None:  # its beats stopped: a frozen agent or a cut link
            for node, seconds in self.presence.silent(self.cfg.heartbeat_timeout).items():
                gone.setdefault(node, f"no heartbeat for {seconds:.1f}s")
        return {**gone, **self.channel.lost_nodes}

    def _post_once(self, key: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.channel.post(key, "1")

    def _check_in_place(self, group: WorkerGroup, attempt: int) -> Outcome | None:
        """Workers that lost a peer wait for their agent; node 0 calls the roll, the others answer
        (through the control thread: a cut link must not block this loop)."""
        specs = [w.spec for w in group.workers]
        if not any(spec.recovery for spec in specs):
            return None
        channel = self.channel
        channel.watch_in_place = True
        if in_place.waiting(specs, attempt):
            self._post_once(f"inplace/{attempt}/{self.node_rank}")
            channel.poke()  # a round with the store now: node 0 calls the roll within a poll
        if self.join_in_place == attempt and in_place.all_ready(specs):
            self._post_once(f"joinready/{attempt}/{self.node_rank}")
            channel.poke()
        if self.is_master:  # its store is local
            try:
                asked = (any(node in self._gone() for node in self.members)  # dead, or silent: frozen, cut off
                         or any(channel.store.check([f"inplace/{attempt}/{node}"]) for node in self.members))
            except RuntimeError:
                return None
            return Outcome("in place") if asked else None
        if channel.roll_called == attempt and len(group.alive()) == len(specs):
            self._post_once(f"here/{attempt}/{self.node_rank}")
        if f"here/{attempt}/{self.node_rank}" in self._said:
            channel.poke()  # node 0 decides as soon as every live node answered: read it at once
        if channel.in_place_attempt > attempt:
            return Outcome("in place")
        return None

    def _prepare_join(self, attempt: int, joiners: list[int]) -> bool:
        """Node 0, nodes asking to join an attempt whose workers can go on in place: host the next
        attempt's store and post its members and ``joining/<node>``; the joiners start their workers
        in it. True once every joiner's workers are ready (the survivors then move: _go_in_place);
        a joiner that goes away (even once it left the channel's joiners) or is not ready within
        GROW_WAIT is dropped, and nothing changed."""
        store, new, join = self.channel.store, attempt + 1, self._join
        if join is not None and join["attempt"] != new:  # the attempt moved on meanwhile: prepared again
            join = self._join = None
        if join is None:
            if not joiners:
                return False
            members = sorted(set(self.members) | set(joiners))
            port, hvd_port = self._attempt_ports(new)  # the running attempt's store stays up beside it
            self._host_attempt_servers(len(members))
            store.set(f"members/{new}", json.dumps(members))
            for node in joiners:
                store.set(f"joining/{node}", str(new))
            self._join = {"attempt": new, "members": members, "joiners": list(joiners), "port": port,
                          "hvd_port": hvd_port, "since": time.monotonic(), "ready": False}
            return False
        closed = self.presence.gone if self.presence is not None else {}  # (a rejoining node's old loss is not this)
        gone = [node for node in join["joiners"] if node in closed or node not in self.channel.joiners]
        late = time.monotonic() - join["since"] > elastic.GROW_WAIT
        if gone or late:
            why = "went away" if gone else f"was not ready within {elastic.GROW_WAIT:.0f}s"
            say(f"node(s) {','.join(map(str, gone or join['joiners']))} {why} before joining in place; going on "
                "without them.")
            self.coordinator.forget_joiners(join["joiners"])
            for node in join["joiners"] if not gone else []:  # not ready in time: told to start again
                self.channel.post(f"join/{node}/answer", f"node {node}: its workers were not ready to join "
                                                         f"within {elastic.GROW_WAIT:.0f}s; start it again.")
            self._join = None
            return False
        join["ready"] = all(store.check([f"joinready/{new}/{node}"]) for node in join["joiners"])
        return join["ready"]

    def _call_off(self, join: dict[str, Any]) -> None:
        """Node 0: a prepared join in place given up (a member was lost meanwhile). Every node
        restarts from the checkpoint in that attempt, the joiners among them, with new members and
        ports: the prepared ones are taken back before the joiners are told, so their agents wait
        for the restart's (their workers wait in the prepared store, which goes now)."""
        store = self.channel.store
        for key in (f"members/{join['attempt']}", f"attempt/{join['attempt']}/ports"):
            store.delete_key(key)
        store.set(f"joinoff/{join['attempt']}", "1")

    def _rejoin(self, attempt: int) -> int | None:
        """A joining node whose join in place node 0 called off: its workers are stopped; it takes
        its place in the restart node 0 decides for the same attempt (or asks to join again when
        that restart is without it); None: the job ended."""
        self.join_in_place, self.channel.joining = None, -1
        say(f"node {self.node_rank}: node 0 called its join in place off (a node was lost meanwhile); every node "
            "restarts from the last checkpoint.")
        store, deadline = self.channel.store, time.monotonic() + self.cfg.rendezvous_timeout
        while time.monotonic() < deadline and self.channel.ended is None and self.channel.lost is None:
            try:
                posted = store.check([f"members/{attempt}"])  # again, by node 0's decision
                members = parse_members(store.get(f"members/{attempt}"), self.cfg.nodes) if posted else None
            except RuntimeError:  # node 0 is gone: the control thread says so
                members = None
            if members is not None:
                return self._enter(attempt, members) if self.node_rank in members else self._first_attempt()
            time.sleep(0.1)
        self.ended = self.channel.ended or (None if self.channel.lost else (
            f"node {self.node_rank}: node 0 posted no restart within {self.cfg.rendezvous_timeout:.0f}s of calling "
            "its join off."))
        return None

    def _go_in_place(self, group: WorkerGroup, attempt: int) -> int | None:
        """The next attempt with the same workers (None: not possible; they are restarted)."""
        started = time.monotonic()
        store = self.channel.store
        if self.is_master:
            gone = self._gone()
            longest = max(in_place.ROLL_WAIT, self.cfg.heartbeat_timeout)
            members = in_place.roll_call(store, attempt, self.members, gone, self._gone, longest)
            join, self._join = self._join, None
            if join is not None and not (join["ready"] and join["attempt"] == attempt + 1 and members == self.members):
                self._call_off(join)  # a node was lost while another joined: every node restarts from the checkpoint
                return None
            if len(members) < self.cfg.min_nodes or len(group.alive()) != len(group.workers):
                return None
            silent = f"its agent did not answer the roll call within {longest:.1f}s after its peers lost it"
            lost = {node: gone.get(node) or silent for node in self.members if node not in members}
            new = attempt + 1
            if join is not None:  # its store is up since _prepare_join, and the joiners' workers wait in it
                members, port, hvd_port = join["members"], join["port"], join["hvd_port"]
            else:
                self._stop_attempt_servers()
                port, hvd_port = self._attempt_ports(new)
                self._host_attempt_servers(len(members))
            store.set(f"inplace/{new}", "1")
            self.coordinator.record_in_place(new, members, lost, join["joiners"] if join else None)
        else:
            new = self.channel.in_place_attempt
            members = parse_members(store.get(f"members/{new}"), self.cfg.nodes)
            if members is None or self.node_rank not in members:
                return None
            port, hvd_port = self._attempt_ports(new)
        self.diagnosis.close()
        previous = list(self.members)
        self._enter(new, members)
        self.attempt_now = new
        joined = [node for node in members if node not in previous]
        self.joined_in[new] = joined
        in_place.place_workers([w.spec for w in group.workers],
                               lambda local: worker_env(self.cfg, self.placement, local, port, hvd_port, new), new,
                               join=bool(joined))
        if self.console is not None:  # the ranks are renumbered: a line is complete when the new world printed it
            self.console.set_world(len(members) * self.cfg.devices_per_node)
        self.diagnosis = AttemptDiagnosis(self.channel, [w.spec for w in group.workers], self.node_rank, new,
                                          self.cfg.hang_timeout, socket.gethostname(), say,
                                          rollback=self.cfg.on_nan == "rollback")
        if self.is_master:
            self.diagnosis.timings_folder = log_dir(self.cfg)
            say(f"in place: attempt {new} on nodes {','.join(map(str, members))}: the survivors kept their workers "
                f"(decided in {time.monotonic() - started:.2f}s)")
        return new

    def _next(self, attempt: int, outcome: Outcome) -> int | None:
        """After an attempt that did not finish the job: the next attempt this node runs, or None."""
        if outcome.kind in ("ok", "signal"):
            return None
        if outcome.kind == "called off":
            return self._rejoin(attempt)
        if not self.cfg.elastic:
            failure = outcome.failure
            restartable = outcome.kind == "failed" and failure is not None and failure.rank is not None
            if not restartable or attempt >= self.cfg.max_restarts:
                return None
        self.channel.post(f"stopped/{attempt}/{self.node_rank}", "1")
        if self.is_master:
            steps = [r.get("step") for r in (self.diagnosis.ranks.values() if self.diagnosis else [])]
            steps = [n for n in steps if isinstance(n, int) and not isinstance(n, bool)]
            if steps and self.coordinator is not None:
                self.coordinator.note_reached(attempt, max(steps))
            if self.ledger is not None and self.coordinator is not None:  # both reports count the same steps again:
                # the furthest of the ranks' summaries (a poll old) and rank 0's record read as the attempt ended
                furthest = max(self.coordinator.reached.get(attempt, -1), self.ledger.reached)
                if furthest >= 0:
                    self.coordinator.reached[attempt] = self.ledger.reached = furthest
            members = self.coordinator.decide(attempt, outcome, self.members)
            if members is None:
                self.ended = self.coordinator.ended
                return None
            return self._enter(attempt + 1, members)
        return self._follow(attempt, outcome.failure)

    def _follow(self, attempt: int, failure: Failure | None = None) -> int | None:
        """A node other than 0: wait for the master's decision (the next attempt, or the end).

        The next attempt may be one the survivors go on in place, decided while this node's workers
        still answered the roll, before they exited (``failure``): new workers started into it
        would meet survivors making the group with the recovery's exchange, not a start-up's
        (gloo aborts both on the mismatch). This node says its failure again in that attempt, so
        node 0 stops it and every node restarts from the last checkpoint, and follows again."""
        while True:
            decision = elastic.follow(self.channel, self.node_rank, attempt,
                                      max(2 * self.cfg.heartbeat_timeout, elastic.CHECK_IN_FLOOR) + 5)
            if isinstance(decision, str) or decision is None:
                self.ended = decision
                return None
            attempt = self._enter(*decision)
            store, node = self.channel.store, self.node_rank
            joining = parse_count(store.get(f"joining/{node}")) if store.check([f"joining/{node}"]) else None
            if not store.check([f"inplace/{attempt}"]) or joining == attempt:  # (a joiner starts in it)
                return attempt
            self.channel.report_failure(failure or Failure(node, None, f"node {node}'s workers had exited when "
                                                                       f"the survivors went on in place"))
            self.channel.post(f"stopped/{attempt}/{self.node_rank}", "1")
            say(f"node {self.node_rank}: its workers had exited when the others went on in place in attempt "
                f"{attempt}; every node restarts from the last checkpoint.")

    # ----- the whole run -------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def _stop_now(self, signum: int, _frame: Any) -> None:
        """Before any worker runs there is nothing to relay or checkpoint: leave at once."""
        self.signum = signum
        raise StoppedEarly(signum)

    def _start(self) -> int | None:
        """Import what the workers' start needs (first: it keeps the GIL for seconds under load, and
        once connected this agent's heartbeats are watched; worker_group.preload), connect, agree
        the layout, find the first attempt; a stop signal meanwhile ends it here
        (``--rendezvous-timeout`` can be minutes)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._stop_now)
        try:
            preload(self.cfg.start_method)
            self._connect()
            self._preflight()
            return self._first_attempt()
        finally:
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._on_signal)

    def run(self) -> int:
        """Pre-flight, attempts, report; returns this agent's exit code."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in FORWARDED_SIGNALS}
        try:
            try:
                attempt: int | None = self._start()
            except StoppedEarly as stop:
                say(f"node {self.node_rank}: stopped by {signal.Signals(stop.signum).name} before the workers started.")
                self.stopped_early = True  # no member has workers to stop: node 0 waits for nobody to leave
                return 128 + stop.signum
            while attempt is not None:
                outcome = self._run_attempt(attempt)
                attempt = self._next(self.attempt_now, outcome)
            return self._report(outcome)  # before closing: the master reads every node's record
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._close()

    def _close(self) -> None:
        if self.channel is not None:
            cut_off = self.channel.lost is not None  # the master is gone: no store to say goodbye to
            gone = set(self._gone()) if self.is_master else set()  # their agents cannot say they left
            self.channel.leave(wait_for_all=self.is_master and not self.stopped_early, gone=gone, flush=not cut_off,
                               also=self.told_done)
            self.channel.stop()
            self.channel.join(timeout=0.2 if cut_off else 3.0)
            # A thread still inside a store call (a cut link) would abort the interpreter's
            # shutdown ("terminate called without an active exception"): exit hard instead.
            self.exit_hard = self.channel.is_alive()
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        if self.presence is not None:
            self.presence.stop()
        if self.presence_link is not None:
            self.presence_link.close()
        self.server = None

    def _report(self, outcome: Outcome) -> int:
        if self.is_master and self.channel is not None and self.channel.longest_silence:
            try:  # beside the logs: how close the live nodes came to --heartbeat-timeout
                presence = dict(self.presence.longest) if self.presence is not None else {}
                (log_dir(self.cfg) / "heartbeats.json").write_text(json.dumps(
                    {"timeout": self.cfg.heartbeat_timeout, "longest_silence": self.channel.longest_silence.copy(),
                     "presence_longest_silence": {str(node): gap for node, gap in presence.items()}}))
            except OSError:
                pass
        if self.console is not None:
            self.console.stop()
        if self.ledger is not None and not self.stopped_early:  # before the outcome: its line stays the last said
            lines = ledger_table(self.ledger.finish())
            say(lines[0])
            for line in lines[1:]:
                print(f"  | {line}", file=sys.stderr)
        code = self._outcome_report(outcome)
        for line in self.timings:
            print(f"  | {line}", file=sys.stderr)
        return code

    def _master_verdict(self) -> str | None:
        """A node other than 0 whose workers lost a peer: why node 0 is gone, or None once it
        answered. Asked until it answers, refuses, or is silent for --heartbeat-timeout: a killed
        node 0 keeps accepting connections until its process is torn down (its memory goes before
        its sockets: under load that came after this node's worker had failed, in 4 of 6 runs, and
        the report blamed this node's own rank), and a frozen one until nothing (it only falls
        silent)."""
        asked, deadline = time.monotonic(), time.monotonic() + self.cfg.heartbeat_timeout + 1.0
        while True:
            gone = self.channel.lost or self.channel.master_gone(now=True)
            if gone or self.channel.answered_since(asked) or time.monotonic() > deadline:
                return gone
            self.channel.poke()
            time.sleep(0.1)

    def _outcome_report(self, outcome: Outcome) -> int:
        if self.coordinator is not None and self.coordinator.history:
            say(f"elastic: {len(self.coordinator.history)} change(s) of nodes in this job:")
            for line in self.coordinator.summary():
                print(f"  | {line}", file=sys.stderr)
        if self.ended:
            say(self.ended)
            return 1
        if outcome.kind == "ok":
            return 0
        if outcome.kind == "signal":
            if self.is_master:
                say(f"stopped by {signal.Signals(outcome.signum).name}; logs in {self.cfg.log_dir or 'the log dir'}")
            return 128 + outcome.signum
        failure = outcome.failure
        if self.is_master and self.channel is not None:
            failure = self.channel.first_failure() or failure
        gone = None
        if self.channel is not None and not self.is_master:
            lost_peer = failure is None or failure.secondary or failure.rank is None
            gone = self.channel.lost or (self._master_verdict() if lost_peer else None)
        if gone and (failure is None or failure.secondary or failure.rank is None):
            # this node's workers failed because node 0 went away: name the cause, not them
            say(f"node {self.node_rank}: stopping: {gone}.")
            return 1
        if failure is None:
            return 1
        where = (f"rank {failure.rank} (node {failure.node}, local rank {failure.local_rank})"
                 if failure.rank is not None else f"node {failure.node}")
        if self.is_master or failure.node == self.node_rank and failure.rank is None:
            after = f" after {failure.elapsed:.1f}s" if failure.elapsed is not None else ""
            why = f": {failure.why}" if failure.why else ""
            say(f"{where} failed first: {failure.how}{after}{why}; stopped the workers on every node.")
            if failure.lines and failure.report:
                if (failure.rank, failure.how) != self.shown:  # a report this agent did not print already
                    for line in failure.lines:
                        print(f"  | {line}", file=sys.stderr)
            elif failure.lines:
                say("last lines of its log:")
                for line in failure.lines:
                    print(f"  | {line}", file=sys.stderr)
        else:
            say(f"node {self.node_rank}: stopping, {where} failed: {failure.how}")
        return failure.exit_code()


def _finished_before(joiners: list[int]) -> None:
    say(f"the job finished before node(s) {','.join(map(str, joiners))} could join in place; their workers were "
        "stopped.")


def _tail(group: WorkerGroup, rank: int) -> list[str]:
    group.tailer.stop()
    return group.tailer.last_lines(rank)
