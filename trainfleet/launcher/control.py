"""The agents' control plane: one TCPStore on the master, a thread in every agent.

Node 0's agent hosts the store at --master-port for the whole job. Every agent runs a
:class:`ControlChannel` thread that talks to it with short timeouts, so the agent's
supervision loop never blocks on the network:

- heartbeats: each agent increments ``hb/<node>`` every ``interval``; the master tracks
  when each counter last moved (its own clock: counters, not timestamps, because the
  hosts' clocks differ), the others track the master's ``hb/master``;
- the first failure of the job, ``job/failure`` (compare-and-set: the first one wins);
- signals to forward to every node, ``job/signal``;
- attempts: ``job/attempt`` and, per attempt, the worker store's port.
"""
from __future__ import annotations

import datetime
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

MASTER = "master"


@dataclass
class Failure:
    """The first failure of a job, as every agent reports it."""

    node: int
    rank: int | None
    how: str
    lines: list[str] = field(default_factory=list)
    local_rank: int | None = None
    elapsed: float | None = None  # seconds from the worker's start to its failure

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Failure":
        return cls(**json.loads(text))


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
        node: this node's rank; node 0 also watches every other node.
        nodes: number of nodes.
        interval: seconds between heartbeats and polls.
        timeout: a peer whose heartbeat did not move for this long is lost.
    """

    def __init__(self, store: Any, node: int, nodes: int, interval: float, timeout: float):
        super().__init__(name="trainfleet-control", daemon=True)
        self.store, self.node, self.nodes = store, node, nodes
        self.interval, self.timeout = interval, timeout
        self.lock = threading.Lock()
        self.failure: Failure | None = None
        self.lost: str | None = None  # why a peer (or the master) is considered gone
        self.signal: int | None = None
        self.attempt = 0
        self.done_attempt = -1
        self._seen: dict[str, tuple[int, float]] = {}
        self._last_contact = time.monotonic()
        self._outbox: list[tuple[str, str]] = []
        self._halt = threading.Event()

    # ----- called by the agent ---------------------------------------------------------
    def report_failure(self, failure: Failure) -> None:
        """Publish this node's failure (the first one of the job wins)."""
        with self.lock:
            if self.failure is None:
                self.failure = failure
        self._send("job/failure", failure.to_json(), first_only=True)

    def report_signal(self, signum: int) -> None:
        """Ask every node to forward ``signum`` to its workers."""
        self._send("job/signal", str(signum))

    def publish(self, key: str, value: str) -> None:
        self._send(key, value)

    def _send(self, key: str, value: str, first_only: bool = False, counter: bool = False) -> None:
        try:
            if counter:
                self.store.add(key, 1)
            elif first_only:
                self.store.compare_set(key, "", value)
            else:
                self.store.set(key, value)
        except RuntimeError:  # unreachable now: the thread retries
            with self.lock:
                self._outbox.append((key, "+1" if counter else value))

    def mark_done(self, attempt: int) -> None:
        """This node's workers all finished attempt ``attempt`` successfully."""
        self._send(f"done/{attempt}", "", counter=True)

    def clear_failure(self) -> None:
        """Forget the last failure (a restart is starting)."""
        with self.lock:
            self.failure, self.signal = None, None

    def leave(self, wait_for_all: bool) -> None:
        """Say this agent is leaving; the master waits (bounded) until every node said so,
        so nobody loses the store before reading the job's final state."""
        try:
            self.store.add("left", 1)
            deadline = time.monotonic() + self.timeout
            while wait_for_all and int(self.store.add("left", 0)) < self.nodes - len(self._gone()):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        except RuntimeError:
            pass

    def _gone(self) -> list[str]:
        return [self.lost] if self.lost else []

    def stop(self) -> None:
        self._halt.set()

    # ----- the thread ------------------------------------------------------------------
    def _beat(self) -> None:
        self.store.add(f"hb/{MASTER if self.node == 0 else self.node}", 1)

    def _watch(self, name: str, now: float) -> None:
        count = int(self.store.add(f"hb/{name}", 0))
        previous = self._seen.get(name)
        if previous is None or previous[0] != count:
            self._seen[name] = (count, now)
        elif now - previous[1] > self.timeout:
            who = "the master (node 0)" if name == MASTER else f"node {name}"
            self.lost = f"lost {who}: no heartbeat for {now - previous[1]:.1f}s"

    def _poll(self) -> None:
        if self.store.check(["job/failure"]):
            text = self.store.get("job/failure")
            if text:
                with self.lock:
                    self.failure = self.failure or Failure.from_json(text)
        if self.store.check(["job/signal"]):
            self.signal = int(self.store.get("job/signal"))
        if self.store.check(["job/attempt"]):
            self.attempt = int(self.store.get("job/attempt"))
        if self.node == 0 and int(self.store.add(f"done/{self.attempt}", 0)) >= self.nodes:
            self.store.set("job/done", str(self.attempt))
        if self.store.check(["job/done"]):
            self.done_attempt = int(self.store.get("job/done"))

    def _flush_outbox(self) -> None:
        with self.lock:
            pending, self._outbox = self._outbox, []
        for key, value in pending:
            self._send(key, value, first_only=key == "job/failure", counter=value == "+1")

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            now = time.monotonic()
            try:
                self._beat()
                self._flush_outbox()
                if self.node == 0:
                    for other in range(1, self.nodes):
                        self._watch(str(other), now)
                else:
                    self._watch(MASTER, now)
                self._poll()
                self._last_contact = time.monotonic()
            except RuntimeError:  # timed out or refused: the link or the master is gone
                silent = time.monotonic() - self._last_contact
                if silent > self.timeout and self.node != 0:
                    self.lost = f"lost the master (node 0): unreachable for {silent:.1f}s"
