"""Elastic jobs (``--nodes MIN:MAX``): who is in each attempt, and what the report says.

A node is known by its id: its ``--node-rank``, its place in ``--hosts``, SLURM's node id,
or its index among simulated nodes. Each attempt runs on a set of members; a member's
position in that set is its GROUP_RANK, so ranks stay contiguous whatever was lost. Node 0
hosts the control store and is in every attempt: losing it ends the job, as losing the
rendezvous host ends a torchrun job.

The master decides every change:

- **lost**: a member's heartbeat stopped (agent killed or frozen, link cut), or after a
  failure it did not check in while its heartbeat was silent. It is dropped; the survivors
  restart from the script's latest checkpoint. Free: not counted in ``--max-restarts``.
- **failed**: a worker exited non-zero. The same members restart while ``--max-restarts``
  lasts; after that the failing node is dropped (a node whose workers keep failing).
- **joined**: a node started later with the same master (``--node-rank K``) asks to join.
  Every worker gets SIGUSR1, so :meth:`Engine.should_stop` turns true at the next step and
  the script checkpoints and returns; the next attempt, with the newcomer, resumes from that
  checkpoint. Nothing is recomputed. A script that does not stop within ``GROW_WAIT``
  seconds is stopped and resumes from its latest checkpoint.

The job fails when fewer than MIN nodes remain.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from trainfleet.engine.contract import IN_PLACE_IMPOSSIBLE
from trainfleet.launcher.config import log_dir
from trainfleet.launcher.store_values import parse_count, parse_members, printable
from trainfleet.utils.errors import UsageError

GROW_WAIT = 60.0  # seconds the workers get to checkpoint and return after a join request
CHECK_IN_FLOOR = 8.0  # seconds a member at least gets to stop its workers and check in after a failure
SILENT_AFTER_FAILURE = 3.0  # after a failure, a member this silent that did not check in is lost


@dataclass
class Change:
    """One change of membership, for the report."""

    attempt: int  # the attempt that starts with the new members
    at: float  # seconds since the job started
    members: list[int]
    lost: dict[int, str] = field(default_factory=dict)
    joined: list[int] = field(default_factory=list)
    restarted: str | None = None  # same members after a worker failure
    resumed: str | None = None  # what rank 0 of the new attempt resumed from

    def describe(self, low: int, high: int) -> str:
        what = [f"lost node {node} ({why})" for node, why in sorted(self.lost.items())]
        what += [f"node {node} joined" for node in self.joined]
        if self.restarted:
            what.append(self.restarted)
        nodes = ",".join(map(str, self.members))
        return (f"+{self.at:.1f}s: {'; '.join(what)}; attempt {self.attempt} on nodes {nodes} "
                f"({len(self.members)} of --nodes {low}:{high})")


def resume_line(record: Any) -> str:
    """``resumed from PATH at epoch E, sample S`` from rank 0's record, or why it did not."""
    if record and isinstance(record.get("in_place"), int) and not isinstance(record["in_place"], bool):
        return (f"went on in place from step {record['in_place']}, held in memory (the survivors' workers kept "
                "their processes; 0 steps computed again)")
    if not record or not record.get("path"):
        return "started fresh (no checkpoint found)"
    data = record.get("data") or {}
    where = f" at epoch {data['epoch']}, sample {data['consumed']}" if "epoch" in data else ""
    return f"resumed from {record['path']}{where}"


def read_record(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


LAYOUT_KEYS = ("nodes", "gpus", "strategy", "precision")


def layout_problem(node: int, theirs: dict[str, Any], mine: dict[str, Any]) -> tuple[str, str] | None:
    """(message, hint) when node ``node`` was started with another layout than node 0."""
    host = printable(str(theirs.get("host", "?")), 80)
    for key in LAYOUT_KEYS:
        if theirs.get(key) != mine[key]:
            return (f"node {node} ({host}) was started with --{key} {printable(str(theirs.get(key)), 80)} but node 0 "
                    f"({mine['host']}) with --{key} {mine[key]}.",
                    "start every node with the same --nodes, --gpus, --strategy and --precision.")
    return None


class Coordinator:
    """Node 0's side of every attempt boundary: who stopped, who is lost, who joins.

    Args:
        cfg: the job's LaunchConfig. channel: node 0's ControlChannel (its store is local).
        layout: node 0's layout, that joiners must match. say: prints one launcher line.
    """

    def __init__(self, cfg: Any, channel: Any, layout: dict[str, Any], say: Any):
        self.cfg, self.channel, self.layout, self.say = cfg, channel, layout, say
        self.started = time.monotonic()
        self.history: list[Change] = []
        self.starts: dict[int, int] = {}  # attempt -> the global step it went on from (rank 0's record)
        self.reached: dict[int, int] = {}  # attempt -> the global step its furthest rank reached
        self.restarts = 0
        self.ended = ""  # why the job ended at a boundary ("": the failure itself is the report)
        self._refused: set[int] = set()
        self._announced: set[int] = set()
        self.gone: Any = lambda: dict(channel.lost_nodes)  # the agent's: heartbeats and closed connections

    # ----- joiners ------------------------------------------------------------------------
    def pending(self, in_place: bool = False) -> list[int]:
        """Nodes asking to join whose layout matches; the others are refused in one line.
        ``in_place``: the running workers take them in without stopping (said once)."""
        if not self.cfg.elastic:
            return []
        ready = []
        for node, theirs in sorted(self.channel.joiners.copy().items()):
            if node in self._refused:
                continue
            problem = layout_problem(node, theirs, self.layout)
            if problem is not None:
                self._refused.add(node)
                self.channel.post(f"join/{node}/answer", str(UsageError(*problem)))
                self.say(f"refused node {node}: {problem[0]}")
                continue
            if node not in self._announced:
                self._announced.add(node)
                self.say(f"node {node} ({theirs['host']}) asks to join: " + (
                    "its workers take the state from their peers' memory and the running workers go on in place."
                    if in_place else
                    "the workers checkpoint and stop at their next step (SIGUSR1), then every node restarts with it."))
            ready.append(node)
        return ready

    def forget_joiners(self, nodes: list[int]) -> None:
        """Their join requests are done with (taken in place, or dropped before they were ready)."""
        for node in nodes:
            self.channel.forget_joiner(node)

    # ----- the boundary -------------------------------------------------------------------
    def _check_ins(self, attempt: int, members: list[int]) -> dict[int, str]:
        """Members that did not stop and check in after a failure, and why they count as lost."""
        channel, store = self.channel, self.channel.store
        gone = self.gone()
        lost = {node: why for node, why in gone.items() if node in members}
        waiting = [node for node in members if node != 0 and node not in lost]
        limit = max(2 * self.cfg.heartbeat_timeout, CHECK_IN_FLOOR)
        deadline = time.monotonic() + limit
        while waiting:
            for node in list(waiting):
                if store.check([f"stopped/{attempt}/{node}"]):
                    waiting.remove(node)
                elif node in (gone := self.gone()) or channel.silent(node) > SILENT_AFTER_FAILURE:
                    lost[node] = gone.get(node) or \
                        f"no heartbeat for {channel.silent(node):.1f}s after the failure"
                    waiting.remove(node)
            if waiting and time.monotonic() > deadline:
                lost.update((node, f"did not stop its workers within {limit:.0f}s") for node in waiting)
                break
            time.sleep(0.1)
        return lost

    def decide(self, attempt: int, outcome: Any, members: list[int]) -> list[int] | None:
        """The members of attempt ``attempt + 1``, posted to every node; None: the job ends here
        (``job/end`` says why; an empty reason leaves the report to the failure itself)."""
        cfg = self.cfg
        finished = outcome.kind == "resize" and outcome.failure is None  # every member stopped cleanly
        lost = {} if finished else self._check_ins(attempt, members)
        failure = self.channel.first_failure() if outcome.failure is not None else None
        restarted = None
        failed = failure is not None and not lost and outcome.kind == "failed"
        if failure is not None and failure.why.startswith(IN_PLACE_IMPOSSIBLE) and (failed or lost):
            # the loss was the cause, not the script: not counted in --max-restarts; the report says why the
            # survivors started again (a rank's shards and their copy lost, a survivor's GPU unusable, ...)
            restarted = failure.why
        elif failed and failure.rank is not None:
            if failure.how == "exit code 2" or (self.restarts >= cfg.max_restarts and not cfg.elastic):
                return self._end("")  # bad input in the script, or no restarts left: the failure is the report
            if self.restarts < cfg.max_restarts:
                self.restarts += 1
                restarted = (f"rank {failure.rank} on node {failure.node} failed ({failure.how}); "
                             f"restarting every node (restart {self.restarts} of {cfg.max_restarts})")
            elif failure.node != 0:
                lost[failure.node] = f"its workers keep failing: rank {failure.rank} {failure.how}"
            else:
                return self._end("")
        if lost and not cfg.elastic:
            return self._end("")
        for node in lost:  # an agent started again for a lost node may take its id back
            self.channel.store.delete_key(f"agent/{node}")
        survivors = [node for node in members if node not in lost]
        joined = self.pending()  # (nodes asking to join count toward MIN: the next attempt takes them)
        if len(survivors) + len(joined) < cfg.min_nodes:
            gone = "; ".join(f"node {node}: {why}" for node, why in sorted(lost.items()))
            return self._end(f"the job stopped: {len(survivors) + len(joined)} node(s) left, fewer than MIN of "
                             f"--nodes {cfg.nodes_spec} (lost {gone}).")
        if outcome.kind == "resize" and outcome.failure is None and not joined:
            restarted = "the node that asked to join went away before the restart; going on without it"
        for node in joined:
            self.channel.forget_joiner(node)
        new = sorted(set(survivors) | set(joined))
        self._post(attempt + 1, new)
        if cfg.elastic:
            change = Change(attempt + 1, time.monotonic() - self.started, new, lost, joined, restarted)
            self.history.append(change)
            self.say(change.describe(cfg.min_nodes, cfg.nodes))
        else:
            self.say(f"{restarted}.")
        return new

    def record_in_place(self, attempt: int, members: list[int], lost: dict[int, str],
                        joined: list[int] | None = None) -> None:
        """Node 0: the survivors of a lost node, or the workers a node joins, go on in place
        (launcher/in_place.py) in ``attempt``."""
        for node in lost:  # an agent started again for a lost node may take its id back
            self.channel.store.delete_key(f"agent/{node}")
        self.forget_joiners(joined or [])
        self._post(attempt, members)
        change = Change(attempt, time.monotonic() - self.started, members, lost, list(joined or []),
                        "the survivors kept their workers (in place)")
        self.history.append(change)
        self.say(change.describe(self.cfg.min_nodes, self.cfg.nodes))

    def _post(self, attempt: int, members: list[int]) -> None:
        store = self.channel.store
        store.set(f"members/{attempt}", json.dumps(members))
        store.set("job/signal", "")
        store.set("job/attempt", str(attempt))
        self.channel.lost_nodes = {n: why for n, why in self.channel.lost_nodes.copy().items() if n not in members}

    def _end(self, reason: str) -> None:
        self.ended = reason
        self.channel.store.set("job/end", reason or " ")
        return None

    # ----- the report -----------------------------------------------------------------------
    def note_reached(self, attempt: int, steps: int) -> None:
        """The most steps a rank completed in ``attempt`` (its progress record's count)."""
        start = self.starts.get(attempt, 0)
        self.reached[attempt] = start + steps

    def note_resume(self, attempt: int) -> bool:
        """Once rank 0 of ``attempt`` resumed (or started fresh), say so and keep it for the
        summary; False while it has not yet."""
        record = read_record(str(log_dir(self.cfg) / f"resume.attempt{attempt}.json"))
        if record is None:
            return False
        line = resume_line(record)
        step = record.get("step")
        if record.get("in_place") is not None:  # the same processes: their step counts go on from where they began
            self.starts[attempt] = self.starts.get(attempt - 1, 0)
        elif isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            self.starts[attempt] = step
            before = self.reached.get(attempt - 1)
            if before is not None and record.get("in_place") is None:
                again = max(before - step, 0)
                line += (f"; {again} step(s) computed again (the attempt before had reached step {before})"
                         if again else "; no step computed again")
        for change in self.history:
            if change.attempt == attempt:
                change.resumed = line
        self.say(f"attempt {attempt}: rank 0 {line}.")
        return True

    def summary(self) -> list[str]:
        return [f"{change.describe(self.cfg.min_nodes, self.cfg.nodes)}; rank 0 "
                f"{change.resumed or 'did not call engine.resume()'}" for change in self.history]


# ----- a node other than 0 ---------------------------------------------------------------------
def wait_to_join(channel: Any, node: int, layout: dict[str, Any], timeout: float) -> tuple[int, list[int], bool]:
    """Ask node 0 to take this node into the running job; wait for the attempt that does, and
    whether this node's workers join the running ones in place (node 0 posts ``joining/<node>``
    with that attempt before the others move to it: they move once this node's workers are ready).

    Raises:
        UsageError: node 0 refused it (another layout), the job ended, or it was not taken in time.
    """
    store = channel.store
    if store.check([f"left/{node}"]):  # this node's earlier agent said it left
        store.delete_key(f"left/{node}")
    store.set(f"join/{node}", json.dumps(layout))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not channel.lost and channel.ended is None:
        if store.check([f"join/{node}/answer"]):
            raise UsageError(printable(store.get(f"join/{node}/answer").decode(errors="replace"), 300))
        if store.check([f"joining/{node}"]):
            prepared = parse_count(store.get(f"joining/{node}"))
            members = parse_members(store.get(f"members/{prepared}"), channel.nodes) if prepared is not None else None
            if members is not None and node in members:
                return prepared, members, True
        latest = channel.attempt
        if latest > 0 and store.check([f"members/{latest}"]):
            members = parse_members(store.get(f"members/{latest}"), channel.nodes)
            if members is not None and node in members:
                return latest, members, False
        time.sleep(0.1)
    raise UsageError(f"node {node}: the job did not take this node within {timeout:.0f}s.",
                     "check node 0's output; --rendezvous-timeout sets the wait.")


def follow(channel: Any, node: int, attempt: int, limit: float) -> tuple[int, list[int]] | str | None:
    """After ``attempt`` ended: the next (attempt, members) node 0 posted, or why this node stops
    (a reason to print, or None when the failure already says it)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not channel.lost:
        if channel.ended is not None:
            reason = channel.ended.strip()
            return f"node {node}: stopping, the master ended the job: {reason}" if reason else None
        latest = channel.attempt
        if latest > attempt:
            members = parse_members(channel.store.get(f"members/{latest}"), channel.nodes)
            if members is None:
                return f"node {node}: the master posted no valid members for attempt {latest}; stopping."
            if node not in members:
                return (f"node {node}: the job went on without this node at attempt {latest} "
                        f"(nodes {members}); start it again to rejoin.")
            return latest, members
        time.sleep(0.1)
    return None
