"""Node 0 knows at once when another node's agent dies: each agent keeps one TCP connection open to
node 0, and a killed process's connection is closed by its kernel (a reset, within milliseconds).

What a closed connection cannot show (a frozen agent, a cut link: no reset comes) the heartbeats
show: the store's (``launcher/control.py``, polled by node 0 every 0.5 s) and this connection's,
an empty line every :data:`BEAT` seconds from a thread of the agent. Node 0 hears these as they
arrive, so a node silent for ``--heartbeat-timeout`` is seen within a poll of the agent's loop
(0.1 s), not within the store's poll: a cut link was noticed 1.5-2.6 s after the cut with a 2 s
timeout, now 1.75-2.1 s. Silence is counted up to the server's last pass over its sockets, so a
stalled server thread cannot make every node look silent. Node 0 does not wait in the roll call
of in-place recovery (:mod:`trainfleet.launcher.in_place`) for a node gone either way.

The hello an agent sends is its node id and, when the job has a token, the token's signature of
``presence/<node>`` (:mod:`trainfleet.launcher.store_auth`): a process that merely reaches the port
cannot pose as a node. A malformed or unsigned hello is dropped.

After the hello the connection carries the node's workers' log lines for the merged console
(``launcher/console.py``): ``<rank> <text>\n`` each (:func:`encode_line`), handed to
``on_line(rank, text)``. They are untrusted text: bounded (:data:`LINE_BYTES`), malformed ones
dropped, ranks checked by the console.
"""
from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any

HELLO_LIMIT = 200  # bytes
BEAT = 0.25  # seconds between another node's beats on its connection (an empty line)
LINE_BYTES = 65536  # a longer line is cut there


def hello(store: Any, node: int) -> bytes:
    """What node ``node`` sends: ``<node> <signature>\\n`` (the signature empty without a token)."""
    sign = getattr(store, "sign", None)
    mac = sign(f"presence/{node}", "1").split(b":", 1)[0] if sign else b""
    return f"{node} ".encode() + mac + b"\n"


def parse_hello(store: Any, raw: bytes, nodes: int) -> int | None:
    """The node a hello names, or None when it is malformed or not signed with this job's token."""
    parts = raw.strip().split(b" ")
    if not parts or not parts[0].isdigit():
        return None
    node = int(parts[0])
    if not 0 < node < nodes:
        return None
    if getattr(store, "sign", None) is not None:
        return node if len(parts) == 2 and raw.strip() + b"\n" == hello(store, node) else None
    return node if len(parts) == 1 else None  # no token: the node id alone


def encode_line(rank: int, text: str) -> bytes:
    """One log line as another node's agent sends it to node 0: ``<rank> <text>\n``."""
    return f"{rank} {text}\n".encode("utf-8", "replace")


def decode_line(raw: bytes) -> tuple[int, str] | None:
    """(rank, text) from one received line (without its newline), or None when it is not one."""
    head, _, text = raw.partition(b" ")
    if not head.isdigit() or len(head) > 9:
        return None
    return int(head), text.decode("utf-8", "replace")


class PresenceServer(threading.Thread):
    """Node 0: who is connected, and since when each node's agent is gone."""

    def __init__(self, sock: socket.socket, store: Any, nodes: int, on_line: Any = None):
        super().__init__(name="trainfleet-presence", daemon=True)
        self.listener, self.store, self.nodes, self.on_line = sock, store, nodes, on_line
        self.buffers: dict[socket.socket, bytes] = {}
        self.listener.setblocking(False)
        self.port = sock.getsockname()[1]
        self.gone: dict[int, float] = {}  # node -> when its connection closed (monotonic)
        self.heard: dict[int, float] = {}  # node -> when anything last came over its connection
        self.longest: dict[int, float] = {}  # node -> the longest gap between two arrivals (its margin)
        self.looked = time.monotonic()  # the end of the server's last pass over its sockets
        self.connected: dict[socket.socket, int | None] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                readable, _, _ = select.select([self.listener, *self.connected], [], [], 0.2)
            except (OSError, ValueError):
                return
            for sock in readable:
                if sock is self.listener:
                    self._accept()
                else:
                    self._read(sock)
            self.looked = time.monotonic()

    def silent(self, timeout: float) -> dict[int, float]:
        """The connected nodes nothing came from for over ``timeout`` seconds before the server's
        last pass (their agent frozen or their link cut), with those seconds."""
        looked, heard, live = self.looked, dict(self.heard), set(self.connected.values())
        return {node: looked - at for node, at in heard.items() if node in live and looked - at > timeout}

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.setblocking(False)
        self.connected[conn] = None

    def _read(self, conn: socket.socket) -> None:
        node = self.connected.get(conn)
        try:
            data = conn.recv(HELLO_LIMIT if node is None else LINE_BYTES)
        except OSError:
            data = b""
        if node is None and data:  # the hello (one short line), maybe with the first log lines
            first, _, rest = data.partition(b"\n")
            node = parse_hello(self.store, first + b"\n", self.nodes)
            if node is not None:
                self.connected[conn] = node
                self.gone.pop(node, None)
                self.heard[node] = time.monotonic()
                self._lines(conn, rest)
                return
        if not data or node is None:  # closed, reset, or not one of ours
            self.connected.pop(conn, None)
            self.buffers.pop(conn, None)
            conn.close()
            if node is not None and node not in self.connected.values():
                self.gone[node] = time.monotonic()
            return
        now = time.monotonic()
        if node in self.heard:
            self.longest[node] = max(self.longest.get(node, 0.0), now - self.heard[node])
        self.heard[node] = now
        self._lines(conn, data)

    def _lines(self, conn: socket.socket, data: bytes) -> None:
        """Hand the complete lines to ``on_line``; keep the rest for the next read."""
        buffer = self.buffers.get(conn, b"") + data
        lines = buffer.split(b"\n")
        rest = lines.pop()
        if len(rest) > LINE_BYTES:
            lines.append(rest[:LINE_BYTES])
            rest = b""
        self.buffers[conn] = rest
        if self.on_line is None:
            return
        for raw in lines:
            found = decode_line(raw)
            if found is None:
                continue
            try:
                self.on_line(*found)
            except Exception:  # noqa: BLE001 - a bad line must not stop the presence watch
                pass

    def stop(self) -> None:
        self._halt.set()
        for conn in list(self.connected):
            conn.close()
        self.listener.close()


class LineLink:
    """Another node: its presence connection to node 0. A thread sends a beat every ``beat``
    seconds; :meth:`send` sends its workers' complete log lines. A link that fails (node 0 gone, a
    cut link) stops sending; the log files keep every line."""

    def __init__(self, sock: socket.socket | None, beat: float = BEAT):
        self.sock = sock
        self.lock = threading.Lock()
        self._halt = threading.Event()
        if sock is not None:
            threading.Thread(target=self._beats, args=(beat,), name="trainfleet-presence-beat", daemon=True).start()

    def _beats(self, beat: float) -> None:
        while not self._halt.wait(beat):
            with self.lock:
                if self.sock is None:
                    return
                try:
                    self.sock.sendall(b"\n")
                except OSError:
                    self.sock = None
                    return

    def close(self) -> None:
        self._halt.set()
        with self.lock:
            if self.sock is not None:
                self.sock.close()
                self.sock = None

    def send(self, rank: int, text: str) -> None:
        with self.lock:
            if self.sock is None:
                return
            try:
                self.sock.sendall(encode_line(rank, text))
            except OSError:
                self.sock = None


def connect(address: tuple[str, int], store: Any, node: int) -> socket.socket | None:
    """Another node: the connection node 0 watches (None when it cannot be made: the roll call
    then waits its full time for this node)."""
    try:
        sock = socket.create_connection(address, timeout=2.0)
        sock.sendall(hello(store, node))
        return sock
    except OSError:
        return None
