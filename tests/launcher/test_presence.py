"""Node 0's presence server (launcher/presence.py): a killed agent's connection says at once that
it is gone; the port is untrusted, so only a hello signed with the job's token counts."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import SCRIPTS
from trainfleet.launcher import presence
from trainfleet.launcher.store_auth import SignedStore


class NoStore:
    """Only what the hello needs (no token: nothing to sign)."""


def _server(store, nodes=3):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = presence.PresenceServer(sock, store, nodes)
    server.start()
    return server


def _until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_killed_agent_is_gone_at_once():
    server = _server(NoStore())
    try:
        child = subprocess.Popen([sys.executable, "-c", (
            "import socket, sys, time; s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
            "s.sendall(b'2 \\n'); time.sleep(60)"), str(server.port)])
        assert _until(lambda: 2 in server.connected.values())
        child.kill()
        killed = time.monotonic()
        assert _until(lambda: 2 in server.gone), "the closed connection was not noticed"
        assert server.gone[2] - killed < 1.0
        child.wait()
    finally:
        server.stop()


@pytest.mark.parametrize("hello", [b"2 \n", b"2 " + b"0" * 32 + b"\n", b"0 \n", b"7 \n", b"x y z\n", b"\xff" * 300])
def test_a_hello_without_the_job_token_or_out_of_range_is_dropped(hello):
    store = SignedStore(object(), "a" * 32, "test")
    server = _server(store)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(hello)
            assert _until(lambda: not server.connected and server.gone == {}, timeout=3)
            sock.settimeout(3)
            try:
                assert sock.recv(10) == b""  # the server closed it
            except ConnectionResetError:  # (with bytes it did not read: a reset)
                pass
    finally:
        server.stop()


def test_the_signed_hello_is_taken_and_its_close_noted():
    store = SignedStore(object(), "a" * 32, "test")
    server = _server(store)
    try:
        sock = presence.connect(("127.0.0.1", server.port), store, 1)
        assert sock is not None
        assert _until(lambda: 1 in server.connected.values())
        sock.close()
        assert _until(lambda: 1 in server.gone)
        again = presence.connect(("127.0.0.1", server.port), store, 1)  # an agent started again for node 1
        assert _until(lambda: 1 not in server.gone)
        again.close()
    finally:
        server.stop()


@contextlib.contextmanager
def _beating_node():
    """Node 0's server and node 1's link to it, beating every 0.05 s; both closed after."""
    store = SignedStore(object(), "a" * 32, "test")
    server = _server(store)
    link = None
    try:
        link = presence.LineLink(presence.connect(("127.0.0.1", server.port), store, 1), beat=0.05)
        assert _until(lambda: 1 in server.connected.values())
        yield server, link
    finally:
        if link is not None:
            link.close()
        server.stop()


def test_a_node_whose_beats_stop_is_silent_within_the_timeout_and_a_beat_away():
    """A frozen agent or a cut link sends nothing and closes nothing: node 0 counts the silence from
    the last beat, and tells it within a pass of its server (0.2 s) after the timeout."""
    with _beating_node() as (server, link):
        began = time.monotonic()
        assert _until(lambda: server.looked - began > 0.6)  # beating: never silent for 0.3 s
        assert server.silent(0.3) == {}
        assert 0 < server.longest[1] < 0.3  # the widest gap between two beats (the soak benchmark reads it)
        link._halt.set()  # the beats stop; the connection stays open (no reset comes)
        stopped = time.monotonic()
        assert _until(lambda: 1 in server.silent(0.3), timeout=3)
        assert 0.3 - 0.05 < time.monotonic() - stopped < 0.3 + 0.05 + 0.25
        assert 1 not in server.gone


def test_a_stalled_server_does_not_make_the_nodes_look_silent():
    with _beating_node() as (server, link):
        server._halt.set()  # its thread stops passing over the sockets (as a stalled one would)
        server.join(timeout=2)
        link._halt.set()
        since = time.monotonic()
        assert not _until(lambda: time.monotonic() - since > 0.6 and server.silent(0.3), timeout=0.8)


@pytest.mark.parametrize("in_place", [True, False])
def test_node_0_leaves_a_node_gone_to_the_in_place_check_when_its_workers_can_go_on(tmp_path, in_place):
    """elastic-recovery.txt at 13d4ee6: one kill in 30 was restarted from disk ("lost node 2 (its
    agent's connection closed)") instead of going on in place. Each poll of node 0's agent asked the
    presence server twice: the in-place check looked a moment before the connection closed, the
    job check a moment after, and took the node as lost the classic way. Now, in an attempt whose
    workers can go on in place, a gone node is the in-place check's alone (at the next poll)."""
    import datetime

    import torch.distributed as dist

    from trainfleet.launcher.agent import NodeAgent
    from trainfleet.launcher.config import LaunchConfig
    from trainfleet.launcher.control import ControlChannel

    store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=5), wait_for_workers=False)
    server = _server(NoStore())
    channel = ControlChannel(store, 0, 3, 0.05, 5.0)
    channel.start()
    child = subprocess.Popen([sys.executable, "-c", (
        "import socket, sys, time; s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
        "s.sendall(b'2 \\n'); time.sleep(60)"), str(server.port)])
    try:
        agent = NodeAgent(LaunchConfig(str(SCRIPTS / "elastic_train.py"), nodes=3, min_nodes=2,
                                       log_dir=str(tmp_path / "logs")), 0)
        agent.channel, agent.presence = channel, server
        channel.watch_in_place = in_place  # what _check_in_place sets when the workers have the recovery files
        assert _until(lambda: 2 in server.connected.values())
        assert agent._check_job(0) is None  # nothing gone yet: what the in-place check saw this poll
        child.kill()
        assert _until(lambda: 2 in server.gone)
        outcome = agent._check_job(0)  # ... and the job check, a moment later in the same poll
        if in_place:
            assert outcome is None and channel.failure is None
        else:  # no in-place recovery in this job: lost, the classic way
            assert outcome.kind == "lost" and "lost node 2: its agent's connection closed" in outcome.failure.how
    finally:
        child.kill()
        child.wait()
        channel.stop()
        channel.join(5)
        server.stop()


def test_an_agent_has_imported_torch_before_it_connects(tmp_path):
    """Loading torch's libraries keeps the GIL: under the suite's load another thread of the
    process waited up to 1.6 s for it. An agent that imported torch at its first start of workers
    did so connected, its heartbeat thread silent that long while node 0 watched it (a node joining
    a running job, or node 0 itself for the others), beside a 2 s --heartbeat-timeout. It imports
    before it connects (with fork, what its workers preload too)."""
    code = ("import sys\n"
            "from trainfleet.launcher.agent import NodeAgent\n"
            "from trainfleet.launcher.config import LaunchConfig\n"
            "def connect(self):\n"
            "    print('at connect:', 'torch' in sys.modules, 'torch._dynamo' in sys.modules, flush=True)\n"
            "    raise SystemExit(0)\n"
            "NodeAgent._connect = connect\n"
            f"cfg = LaunchConfig({str(SCRIPTS / 'elastic_train.py')!r}, nodes=2, log_dir={str(tmp_path)!r})\n"
            "NodeAgent(cfg, 1)._start()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.stdout == "at connect: True True\n", result.stdout + result.stderr
