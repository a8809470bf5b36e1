"""Which local address and interface reach an address: what gloo and NCCL must be told.

gloo resolves the hostname to pick its interface, which on many machines (and in
network namespaces) gives 127.0.0.1 and a peer that cannot connect back; naming the
interface that routes to the master avoids that.
"""
from __future__ import annotations

import fcntl
import socket
import struct

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
