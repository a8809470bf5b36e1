"""A failure belongs to its attempt: one that reaches the store late never fails the next attempt.

Seen in CI (test_a_hang_restarts_under_max_restarts): the restarted attempt ended at once on the
first attempt's hang, with no report of its own. Before the fix there was one ``job/failure`` key
for the whole job, reset by node 0 between attempts; a value written after the reset (a node still
in the old attempt reporting late, or the control thread's read of the old value landing after the
agent moved on) failed the new attempt.
"""
from __future__ import annotations

import datetime
import threading
import time

import torch.distributed as dist

from trainfleet.launcher.control import ControlChannel
from trainfleet.launcher.store_values import Failure


def _rounds(channel: ControlChannel, count: int) -> None:
    """Wait until ``channel``'s thread has completed ``count`` more rounds with the store."""
    for _ in range(count):
        since = channel._last_contact
        deadline = time.monotonic() + 10
        while channel._last_contact == since and time.monotonic() < deadline:
            time.sleep(0.01)
        assert channel._last_contact != since, "the control thread made no round in 10 s"


def test_a_late_failure_of_the_previous_attempt_does_not_fail_the_next():
    server = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=5), wait_for_workers=False)
    port = server.port

    def client():
        return dist.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=5))

    master = ControlChannel(client(), 0, 2, 0.05, 5.0)
    behind = ControlChannel(client(), 1, 2, 0.05, 5.0)
    for channel in (master, behind):
        channel.start()
    try:
        master.report_failure(Failure(0, 0, "hung: no rank made progress"))
        _rounds(master, 2)
        assert master.failure is not None
        master.begin_attempt(1)  # node 0 decided: attempt 1 starts; node 1 has not caught up yet
        behind.report_failure(Failure(1, 1, "exit code -15"))  # its workers, stopped for attempt 0
        _rounds(behind, 2)
        _rounds(master, 3)
        assert master.failure is None, master.failure
        assert master.first_failure(wait=0.2) is None  # nor does the coordinator read it for attempt 1
        behind.begin_attempt(1)
        behind.report_failure(Failure(1, 1, "exit code 7"))  # a failure of attempt 1 does count
        _rounds(behind, 2)
        _rounds(master, 3)
        assert master.failure is not None and master.failure.how == "exit code 7"
    finally:
        for channel in (master, behind):
            channel.stop()
            channel.join(5)
        assert not any(t.name == "trainfleet-control" and t.is_alive() for t in threading.enumerate())


def test_node_0_reads_the_summaries_while_its_control_thread_adds_them():
    """Seen in CI (test_every_node_gets_node_0s_run_id): node 0's agent died with "dictionary changed
    size during iteration": it merged the members' progress summaries while its control thread
    stored a newly read one. Here a thread stores and drops summaries as fast as it can while the
    agent's diagnosis reads them; the switch interval is shortened so the two interleave often."""
    import sys

    from trainfleet.launcher.diagnosis import AttemptDiagnosis

    channel = ControlChannel(None, 0, 64, 0.05, 5.0)
    channel.members = list(range(64))
    diagnosis = AttemptDiagnosis(channel, [], 0, 0, None, "host", lambda line: None)
    stop = threading.Event()

    def control_thread():
        node = 1
        while not stop.is_set():
            channel.progress[node] = {"ranks": {}}
            channel.progress.pop(node - 20, None)
            node = node % 60 + 1

    writer = threading.Thread(target=control_thread, daemon=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    writer.start()
    try:
        for _ in range(20000):
            diagnosis.final_lines()
    finally:
        stop.set()
        writer.join(5)
        sys.setswitchinterval(interval)


def test_node_0_does_not_wait_for_a_node_whose_agent_is_gone_to_say_it_left():
    """Seen in benchmarks/faults ('kill -9 agent'): node 0 saw the killed agent's connection close at
    once, stopped the job, then waited --heartbeat-timeout for that agent's "left" before exiting."""
    server = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=5), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, None, False, datetime.timedelta(seconds=5))
    channel = ControlChannel(client, 0, 2, 0.05, 30.0)  # node 1 never says it left; the wait is at most 30 s
    channel.start()
    try:
        began = time.monotonic()
        channel.leave(wait_for_all=True, gone={1})
        assert time.monotonic() - began < 10.0  # not the 30 s a live member gets
    finally:
        channel.stop()
        channel.join(5)


class _ForgetDuringRead(ControlChannel):
    """Node 0's channel whose watch, as it reads node 2's join request, lets the agent forget that
    request from another thread (the interleaving that brought a joined node back as a joiner)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.forgotten = threading.Event()

    def _read(self, key, parse):
        value = super()._read(key, parse)
        if key == "join/2" and not self.forgotten.is_set():
            threading.Thread(target=self._forget, daemon=True).start()
            self.forgotten.wait(1.0)  # without the lock the forget is done by now; with it, it waits for this read
        return value

    def _forget(self):
        if hasattr(self, "forget_joiner"):
            self.forget_joiner(2)
        else:  # the old code: the agent's Coordinator.forget_joiners did this, with no lock
            self.joiners.pop(2, None)
            self.store.delete_key("join/2")
        self.forgotten.set()


def test_a_join_request_forgotten_while_node_0_reads_it_does_not_come_back():
    """Seen 1 run in ~10 of test_a_node_that_goes_away_while_it_joins_in_place...[after]: node 0's
    control thread read node 2's ``join/2`` as the agent, having taken node 2 in place, forgot it;
    the thread then put it back among the joiners, node 0 prepared a second join of node 2, and
    node 2's loss a moment later ended the job ("a node was lost while another joined")."""
    server = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=5), wait_for_workers=False)
    store = dist.TCPStore("127.0.0.1", server.port, None, False, datetime.timedelta(seconds=5))
    store.set("join/2", '{"host": "h", "gpus": 1}')
    store.set("hb/2", "1")
    channel = _ForgetDuringRead(store, 0, 3, 0.05, 5.0)
    channel.members = [0, 1]
    channel._watch_nodes(time.monotonic())
    assert channel.forgotten.wait(5)
    assert channel.joiners == {} and not store.check(["join/2"])


def test_the_roll_call_waits_for_a_late_agent_that_still_beats_and_gives_up_a_silent_one():
    """Seen on a loaded machine: node 1's agent answered node 0's roll call after ROLL_WAIT (1 s),
    and node 0 took a healthy node out of the in-place attempt. The roll now waits longer (up to
    --heartbeat-timeout) for an agent still connected and beating, and gives one up once it is
    silent (``gone`` names it) or at that limit."""
    from trainfleet.launcher import in_place

    server = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=5), wait_for_workers=False)
    store = dist.TCPStore("127.0.0.1", server.port, None, False, datetime.timedelta(seconds=5))
    started = time.monotonic()
    late = threading.Timer(1.5, lambda: store.set("here/3/1", "1"))  # node 1: late, but beating all along
    late.start()
    silent_after = started + 1.2  # node 2: frozen, found silent at 1.2 s; node 3 beats and never answers

    def gone() -> dict[int, str]:
        return {2: "no heartbeat for 2.0s"} if time.monotonic() >= silent_after else {}

    answered = in_place.roll_call(store, 3, [0, 1, 2, 3], {}, gone, longest=2.5)
    took = time.monotonic() - started
    late.join()
    assert answered == [0, 1]
    assert took >= 2.5  # node 3 was waited for until the limit; node 2 only until it was found silent
    assert store.check(["rollcall/3"])
