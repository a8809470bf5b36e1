"""Ports and interfaces: the rendezvous port bound before anything forks (and who holds it when
it is taken), and which local interface reaches an address (what gloo and NCCL must be told).

gloo resolves the hostname to pick its interface, which on many machines (and in
network namespaces) gives 127.0.0.1 and a peer that cannot connect back; naming the
interface that routes to the master avoids that.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
from pathlib import Path

from trainfleet.utils.errors import UsageError

SIOCGIFADDR = 0x8915


def local_address_for(remote: str, port: int = 9) -> str:
    """The local IPv4 address the kernel would use to reach ``remote`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(remote), port))
        return probe.getsockname()[0]


def interface_addresses() -> dict[str, str]:
    """IPv4 address of every interface that has one, by interface name."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as handle:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(handle.fileno(), SIOCGIFADDR, request)
            except OSError:  # no IPv4 address on this interface
                continue
            found[name] = socket.inet_ntoa(reply[20:24])
    return found


def interface_for(remote: str) -> str | None:
    """Name of the interface whose address routes to ``remote`` (``lo`` for loopback)."""
    address = local_address_for(remote)
    for name, ip in interface_addresses().items():
        if ip == address:
            return name
    return None


def holder_of(port: int) -> str | None:
    """``pid N (command)`` of the local process listening on ``port``, if we can tell."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
        except OSError:
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] in inodes for fd in fds):
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                return f"pid {pid} ({command[:80]})"
        except OSError:
            continue
    return None


def reserve_port(addr: str, port: int | None) -> socket.socket:
    """Bind (and listen on) a rendezvous port now; port None picks a free one.

    Raises:
        UsageError: the port is taken (naming the process holding it, e.g. a stale
            worker of an earlier run) or the address is not local.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port or 0))
        sock.listen(1024)
    except OSError as err:
        sock.close()
        if port:
            holder = holder_of(port)
            held = f", held by {holder}" if holder else ""
            raise UsageError(f"--master-port {port} on {addr} is not available ({err.strerror}{held}).",
                             "stop that process, pick another port, or omit --master-port.") from err
        raise UsageError(f"cannot listen on --master-addr {addr} ({err.strerror}).",
                         "use an address of this host (node 0 is the master).") from err
    return sock
