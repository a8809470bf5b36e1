"""The agents' control plane: one TCPStore on the master, a thread in every agent.

Node 0's agent hosts the store at --master-port for the whole job. Every agent runs a
:class:`ControlChannel` thread that talks to it with short timeouts, so the agent's
supervision loop never blocks on the network:

- heartbeats: each agent writes its own counter to ``hb/<node>`` every ``interval``; the master
  tracks when each counter last moved (its own clock: counters, not timestamps, because the
  hosts' clocks differ), the others track the master's ``hb/master``;
- the first failure of each attempt, ``job/failure/<attempt>`` (compare-and-set: the first one
  wins), and each node's own, ``failure/<attempt>/<node>``: per attempt, so a value the thread
  sends or reads late can never fail the next attempt;
- signals to forward to every node, ``job/signal``;
- attempts: ``job/attempt``, its members ``members/<attempt>`` and the worker store's port;
- elastic jobs: ``join/<node>`` (a node asking to join), ``left/<node>`` (a node leaving).

Trust: anything that reaches the port can write any key (torchrun's store is the same, and it
unpickles values). Every value read here is parsed and checked, a malformed one is ignored (said
once), and no key is incremented on the server (``TCPStore.add`` on a non-number closes the
connection): counters are written whole with ``set``. So a bad value cannot kill the control
thread or crash the job. The store handed to the channel signs and verifies every value with the
job token (:mod:`trainfleet.launcher.store_auth`), so an outsider cannot stop the job either.
"""
from __future__ import annotations

import datetime
import socket
import sys
import threading
import time
from typing import Any

from trainfleet.launcher.store_values import Failure, parse_count, parse_dict, parse_signal, printable

MASTER = "master"


def connect(addr: str, port: int, timeout_s: float, is_master: bool = False, listen_fd: int | None = None) -> Any:
    """A TCPStore client (or the server, on the master, adopting ``listen_fd``)."""
    import torch.distributed as dist

    if is_master:
        return dist.TCPStore(addr, port, None, True, datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False, master_listen_fd=listen_fd, use_libuv=True)
    return dist.TCPStore(addr, port, None, False, datetime.timedelta(seconds=timeout_s))


class ControlChannel(threading.Thread):
    """Heartbeats and job state between this agent and the master, on a thread.

    Args:
        store: a client of the control store (timeouts short: a cut link must not
            stall the thread for long).
        node: this node's id; node 0 also watches the other members and the nodes asking to join.
        nodes: the most nodes the job can have (node ids are 0..nodes-1).
        interval: seconds between heartbeats and polls.
        timeout: a peer whose heartbeat did not move for this long is lost.
        master: the store's address; a node other than 0 probes it when a round fails, to tell
            a dead master (refused at once) from a slow one.
    """

    def __init__(self, store: Any, node: int, nodes: int, interval: float, timeout: float,
                 master: tuple[str, int] | None = None):
        super().__init__(name="trainfleet-control", daemon=True)
        self.store, self.node, self.nodes, self.master = store, node, nodes, master
        self.interval, self.timeout = interval, timeout
        self.lock = threading.Lock()
        self.failure: Failure | None = None
        self.current = 0  # the attempt this agent is in (its failure keys are this attempt's)
        self.lost: str | None = None  # why the master is considered gone (other nodes)
        self.lost_nodes: dict[int, str] = {}  # node 0: members considered gone, and why
        self.members: list[int] = list(range(nodes))  # this attempt's members (the agent sets them)
        self.joiners: dict[int, dict] = {}  # node 0: nodes asking to join, with their layout
        self._joiners_lock = threading.Lock()  # a request read as it is forgotten must not come back (forget_joiner)
        self.signal: int | None = None
        self.signal_attempt = -1  # the attempt whose workers the signal is for
        self.attempt = 0
        self.done_attempt = -1
        self.done_nodes: set[int] = set()  # node 0: members whose workers finished the current attempt
        self.ended: str | None = None  # the master ended the job (job/end), with its reason
        self._seen: dict[str, tuple[int, float]] = {}
        self.longest_silence: dict[str, float] = {}  # node -> seconds (node 0: each member's)
        self._last_contact = time.monotonic()
        self._last_beat = 0.0
        self._outbox: list[tuple[str, str, str]] = []  # (kind, key, value), sent by the thread
        self._halt = threading.Event()
        self._wake = threading.Event()
        self._flushed = threading.Event()
        self._beats = 0
        self._complained: set[str] = set()  # keys whose malformed value was already reported
        self.broken: str | None = None  # an unexpected error the thread survived
        self.hang_attempt = -1  # node 0 asked every node for its workers' stacks (job/hang)
        self.progress: dict[int, dict] = {}  # node 0: each member's progress summary (launcher/diagnosis.py)
        self.hang_reports: dict[int, dict] = {}  # node 0: each member's stacks, after job/hang
        self.roll_called = -1  # in-place recovery: node 0 called the roll in this attempt (rollcall/<attempt>)
        self.in_place_attempt = -1  # ... and went on in place in this attempt (inplace/<attempt>)
        self.joining = -1  # a joining node: the attempt its workers join in place (set by its agent)
        self.join_called_off = -1  # ... which node 0 called off (joinoff/<attempt>): every node restarts
        self.watch_in_place = False  # the agent looks for both (read here: a cut link must not block it)

    # ----- called by the agent ---------------------------------------------------------
    def report_failure(self, failure: Failure) -> None:
        """Publish this node's failure; the job fails on the first one to arrive."""
        with self.lock:
            if self.failure is None:
                self.failure = failure
            attempt = self.current
        self._send(f"failure/{attempt}/{self.node}", failure.to_json())
        self._send(f"job/failure/{attempt}", failure.to_json(), first_only=True)

    def first_failure(self, wait: float = 1.0) -> Failure | None:
        """The earliest failure any node recorded (waiting briefly for the others' records).

        A worker killed by its peer's death fails a moment after the peer: the earliest
        wall-clock time names the cause, not whichever report reached the store first.
        """
        found: dict[int, Failure] = {}
        deadline = time.monotonic() + wait
        members, attempt = list(self.members), self.current
        while True:
            try:
                for node in members:
                    if node not in found:
                        failure = self._read(f"failure/{attempt}/{node}",
                                             lambda raw: Failure.from_json(raw) if raw else None)
                        if failure is not None:
                            found[node] = failure
            except RuntimeError:
                break
            if len(found) == len(members) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        candidates = list(found.values()) + ([self.failure] if self.failure else [])
        # A rank killed by a signal leaves no timestamp of its own (its agent notes when it
        # reaped it), so a peer's "connection reset" can look earlier: causes beat consequences.
        return min(candidates, key=lambda f: (f.secondary, f.at)) if candidates else None

    def report_signal(self, signum: int, attempt: int) -> None:
        """Ask every node to forward ``signum`` to its workers of ``attempt`` (a relay read
        late must not reach the next attempt's workers)."""
        self._send("job/signal", f"{attempt} {signum}")

    def _send(self, key: str, value: str, first_only: bool = False) -> None:
        """Queue a write for the thread: on a cut link a store call can block indefinitely
        (the client's timeout does not cover every receive), and the agent must not."""
        kind = "first" if first_only else "set"
        with self.lock:
            self._outbox.append((kind, key, value))
            self._flushed.clear()
        self._wake.set()

    def answered_since(self, when: float) -> bool:
        """Whether a round with the master's store succeeded after ``when`` (monotonic)."""
        return self._last_contact > when

    def poke(self) -> None:
        """A round with the store now, not at the next interval (the agent waits for an answer)."""
        self._wake.set()

    def silent_for(self) -> float:
        """Seconds since the thread last completed a round with the master's store."""
        return time.monotonic() - self._last_contact

    def mark_done(self, attempt: int) -> None:
        """This node's workers all finished attempt ``attempt`` successfully."""
        self._send(f"done/{attempt}/{self.node}", "1")

    def post(self, key: str, value: str) -> None:
        """Set ``key`` in the store (through the thread)."""
        self._send(key, value)

    def begin_attempt(self, attempt: int) -> None:
        """Forget the last attempt's failure: ``attempt`` is starting on this node."""
        with self.lock:
            self.failure, self.signal, self.current = None, None, attempt

    def silent(self, node: int) -> float:
        """Node 0: seconds since ``node``'s heartbeat last moved (0 when never watched)."""
        seen = self._seen.get(str(node))
        return time.monotonic() - seen[1] if seen else 0.0

    def leave(self, wait_for_all: bool, gone: set[int] | None = None, flush: bool = True,
              also: tuple[int, ...] = ()) -> None:
        """Say this agent is leaving. The master (whose store is local) waits, bounded,
        until every member (and ``also``: joiners told the job ended) said so, so nobody loses
        the store before reading the job's final state; the others wait at most a second for
        their message to go out (none when not ``flush``: the master is gone). Members lost, or
        ``gone`` (their agent's connection closed), are not waited for."""
        self._send(f"left/{self.node}", "1")
        if flush:
            self._flushed.wait(1.0)
        if not wait_for_all:
            return
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                waiting = [node for node in (*self.members, *also)
                           if node not in self.lost_nodes and node not in (gone or ())]
                if all(self.store.check([f"left/{node}"]) for node in waiting):
                    break
                time.sleep(0.05)
        except RuntimeError:
            pass

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()

    # ----- the thread ------------------------------------------------------------------
    def master_gone(self, now: bool = False) -> str | None:
        """Why the master is gone: its port refuses connections (node 0's agent died: its host's
        kernel answers for it, at once), or it has been silent for the timeout (a dead host, a cut
        link). None while it may only be slow. Probed after a failed round of the thread (or
        ``now``: this node's workers just lost a peer)."""
        if self.master is not None and (now or time.monotonic() - self._last_contact > self.interval):
            try:
                socket.create_connection(self.master, timeout=min(self.interval, 1.0)).close()
            except ConnectionRefusedError:
                return "node 0 (the master) is gone: its control store refuses connections"
            except OSError:
                pass
        if self.silent_for() > self.timeout:
            return f"lost the master (node 0): no answer for {self.silent_for():.1f}s"
        return None

    def _beat(self) -> None:
        if time.monotonic() - self._last_beat >= self.interval:
            self._beats += 1
            self.store.set(f"hb/{MASTER if self.node == 0 else self.node}", str(self._beats))
            self._last_beat = time.monotonic()

    def _watch(self, name: str, now: float) -> str | None:
        """Why ``name`` is lost (its heartbeat did not move for ``timeout``), else None."""
        raw = self.store.get(f"hb/{name}") if self.store.check([f"hb/{name}"]) else b"0"
        count = parse_count(raw, limit=1 << 62)
        if count is None:  # not a heartbeat: it does not move
            count = self._seen.get(name, (-1, now))[0]
        previous = self._seen.get(name)
        if previous is None or previous[0] != count:
            if previous is not None:  # the longest silence a live peer showed (the soak benchmark reads it)
                self.longest_silence[name] = max(self.longest_silence.get(name, 0.0), now - previous[1])
            self._seen[name] = (count, now)
        elif now - previous[1] > self.timeout:
            return f"no heartbeat for {now - previous[1]:.1f}s"
        return None

    def _watch_nodes(self, now: float) -> None:
        """Node 0: the members (lost when silent, or when they said they left) and the joiners."""
        for node in [n for n in self.members if n != 0 and n not in self.lost_nodes]:
            why = "left the job" if self.store.check([f"left/{node}"]) else self._watch(str(node), now)
            if why is not None:
                self.lost_nodes[node] = why
        for node in range(1, self.nodes):
            with self._joiners_lock:
                if node in self.members or not self.store.check([f"join/{node}"]):
                    continue
                layout = self._read(f"join/{node}", parse_dict)
                if layout is not None and self._watch(str(node), now) is None \
                        and not self.store.check([f"left/{node}"]):
                    self.joiners.setdefault(node, layout)
                else:
                    self.joiners.pop(node, None)

    def forget_joiner(self, node: int) -> None:
        """Node 0: ``node``'s join request is done with (it joined, or was dropped): gone from the
        joiners and the store at once, so the watch above cannot read it back in between (a node
        that joined in place came back as a joiner once in ~10 runs, and its loss then ended the job)."""
        with self._joiners_lock:
            self.joiners.pop(node, None)
            for key in (f"join/{node}", f"joining/{node}"):
                self.store.delete_key(key)

    def _read(self, key: str, parse: Any) -> Any:
        """``parse(value)`` of ``key`` when it is set and well formed; a malformed value (anything
        that reaches the port can write one) is ignored, and said once."""
        if not self.store.check([key]):
            return None
        raw = self.store.get(key)
        try:
            value = parse(raw)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            value = None
        if value is None and raw and key not in self._complained:
            self._complained.add(key)
            print(f"launch: node {self.node}: ignoring a malformed {key} in the control store: "
                  f"{printable(raw.decode(errors='replace'), 80)!r}", file=sys.stderr, flush=True)
        return value

    def _poll(self) -> None:
        current = self.current
        failure = self._read(f"job/failure/{current}", lambda raw: Failure.from_json(raw) if raw else None)
        if failure is not None:
            with self.lock:
                if self.current == current:  # the agent did not move on while the value was read
                    self.failure = self.failure or failure
        relayed = self._read("job/signal", lambda raw: parse_signal(raw) if raw else (-1, None))  # "": none
        if relayed is not None:
            self.signal_attempt, self.signal = relayed
        attempt = self._read("job/attempt", parse_count)
        if attempt is not None:
            self.attempt = attempt
        if self.watch_in_place and self.node != 0:
            if self.store.check([f"rollcall/{current}"]):
                self.roll_called = current
            if self.attempt > current and self.store.check([f"inplace/{self.attempt}"]):
                self.in_place_attempt = self.attempt
        if self.joining >= 0 and self.store.check([f"joinoff/{self.joining}"]):
            self.join_called_off = self.joining
        self._read_diagnosis()  # before the done count: a node posts its last summary, then "done"
        if self.node == 0:
            self.done_nodes = {node for node in self.members if self.store.check([f"done/{self.attempt}/{node}"])}
        done = self._read("job/done", parse_count)
        if done is not None:
            self.done_attempt = done
        ended = self._read("job/end", lambda raw: printable(raw.decode(errors="replace"), 300))
        if ended is not None:
            self.ended = ended

    def _read_diagnosis(self) -> None:
        """Every node: whether node 0 asked for stacks (``job/hang``); node 0: each member's progress
        summary and, after ``job/hang``, its workers' stacks."""
        hang = self._read("job/hang", parse_count)
        if hang is not None:
            self.hang_attempt = hang
        if self.node == 0:
            for node in list(self.members):
                if node != 0:  # node 0's own summary is handed over in memory
                    summary = self._read(f"progress/{self.attempt}/{node}", parse_dict)
                    if summary is not None:
                        self.progress[node] = summary
                if self.hang_attempt == self.attempt and node not in self.hang_reports:
                    report = self._read(f"hang/{self.attempt}/{node}", parse_dict)
                    if report is not None:
                        self.hang_reports[node] = report

    def members_progress(self) -> dict[int, dict]:
        """Node 0: this attempt's members' progress summaries, copied (the control thread adds to
        ``progress`` while the agent reads it)."""
        members = set(self.members)
        return {node: summary for node, summary in self.progress.copy().items() if node in members}

    def _flush_outbox(self) -> None:
        with self.lock:
            pending = list(self._outbox)
        for kind, key, value in pending:
            if kind == "first":
                self.store.compare_set(key, "", value)
            else:
                self.store.set(key, value)
            with self.lock:
                self._outbox.pop(0)
        with self.lock:
            if not self._outbox:
                self._flushed.set()

    def run(self) -> None:
        while not self._halt.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._halt.is_set():
                return
            now = time.monotonic()
            try:
                self._beat()
                self._flush_outbox()
                if self.node == 0:
                    self._watch_nodes(now)
                else:
                    why = self._watch(MASTER, now)
                    if why is not None:
                        self.lost = f"lost the master (node 0): {why}"
                self._poll()
                self._last_contact = time.monotonic()
            except RuntimeError:  # timed out or refused: is the master gone, or only slow?
                if self.node != 0 and self.lost is None:
                    self.lost = self.master_gone()
            except Exception as err:  # a bug, or a value no check foresaw: say so, keep the thread
                if self.broken is None:
                    self.broken = f"{type(err).__name__}: {err}"
                    print(f"launch: node {self.node}: the control thread hit {self.broken}; going on",
                          file=sys.stderr, flush=True)
