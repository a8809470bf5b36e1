"""The hosts of a ``launch --hosts a,b[:slots]`` / ``--hostfile`` job and how to reach them: names
checked before they reach ssh (never an option: no leading '-'; ``user@host``, IPv4, ``[IPv6]``),
slots, ssh options and the variables to forward. No torch, no network."""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
from pathlib import Path
from typing import Sequence

from trainfleet.utils.errors import UsageError

SSH_BASE = ("ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3")


@dataclasses.dataclass
class Host:
    name: str
    slots: int | None = None


@dataclasses.dataclass
class HostsPlan:
    """The hosts, in node order, and how to reach them."""

    hosts: list[Host]
    ssh_opts: list[str] = dataclasses.field(default_factory=list)
    env_names: list[str] = dataclasses.field(default_factory=list)
    master_addr: str | None = None  # where the other hosts reach node 0; None: the first host's address

    def ssh(self, host: str, command: str) -> list[str]:
        """The ssh command line; ``--`` ends ssh's options, so no host can be read as one."""
        return [*SSH_BASE, *self.ssh_opts, "--", ssh_name(host), command]


# user@ (optional), then a DNS name or IPv4 address, or an IPv6 literal in brackets; never a
# leading '-' (ssh would read the name as an option: -oProxyCommand=...)
_HOST = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*@)?(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.%]+\])$")


def check_host(name: str, where: str) -> str:
    """``name`` if it is a host name, ``user@host`` or ``[IPv6]``; else a UsageError.

    Raises:
        UsageError: anything else, a name starting with '-' above all.
    """
    if not _HOST.match(name):
        raise UsageError(f"{where}: {name!r} is not a host name (expected host, user@host, an IPv4 address or "
                         "[IPv6]; a name may not start with '-').", "check the spelling of the host.")
    return name


def _split_slots(item: str) -> tuple[str, str]:
    """``host:4`` -> (host, "4"); ``[::1]:4`` -> ([::1], "4"); a bare IPv6 literal has no slots."""
    if item.startswith("[") or "@[" in item:
        name, _, rest = item.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else rest
    if item.count(":") == 1 and re.search(r":\d+$", item):
        name, _, slots = item.rpartition(":")
        return name, slots
    return item, ""


def parse_hosts(text: str) -> list[Host]:
    """``a,b:2,user@c:4,[fe80::1]:2`` -> hosts with optional slot counts."""
    hosts = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, slots = _split_slots(item)
        check_host(name, f"--hosts {text!r}")
        hosts.append(Host(name, _slots(slots, f"--hosts {text!r}") if slots else None))
    if not hosts:
        raise UsageError(f"--hosts {text!r} names no host.", "e.g. --hosts node1:4,node2:4")
    return hosts


def parse_hostfile(path: str) -> list[Host]:
    """DeepSpeed/MPI style: one ``host [slots=N]`` per line; ``#`` starts a comment."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise UsageError(f"--hostfile {path!r} cannot be read ({err.strerror}).", "check the path.") from err
    hosts = []
    for number, raw in enumerate(lines, 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        slots = None
        for word in words[1:]:
            key, _, value = word.partition("=")
            if key not in ("slots", "max_slots") or not value:
                raise UsageError(f"--hostfile {path}:{number}: {raw.strip()!r}: expected 'host slots=N'.")
            if key == "slots":
                slots = _slots(value, f"--hostfile {path}:{number}")
        hosts.append(Host(check_host(words[0], f"--hostfile {path}:{number}"), slots))
    if not hosts:
        raise UsageError(f"--hostfile {path!r} names no host.", "one 'host slots=N' per line.")
    return hosts


def _slots(text: str, where: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{where}: slots {text!r} must be a positive integer.")
    return int(text)


def plan_from_args(hosts: str | None, hostfile: str | None, ssh_opts: Sequence[str] | None,
                   env_names: Sequence[str] | None, master_addr: str | None = None) -> HostsPlan:
    if hosts and hostfile:
        raise UsageError("--hosts and --hostfile were both given.", "use one of them.")
    parsed = parse_hosts(hosts) if hosts else parse_hostfile(str(hostfile))
    names = [h.name for h in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"host {repeated[0]!r} is listed twice.", "list each host once, with its slots.")
    for name in env_names or []:
        if name not in os.environ:
            raise UsageError(f"--env {name}: it is not set here, so there is nothing to forward.",
                             f"export {name}=... first, or drop --env {name}.")
    if master_addr is not None:
        check_host(master_addr, "--master-addr")
    return HostsPlan(parsed, [opt for text in ssh_opts or [] for opt in shlex.split(text)], list(env_names or []),
                     master_addr)


def workers_per_host(plan: HostsPlan, gpus: int | None) -> int | None:
    """The one worker count every host runs: the hosts' slots, or --gpus."""
    counts = {h.slots for h in plan.hosts if h.slots is not None}
    if len(counts) > 1:
        listed = ", ".join(f"{h.name}:{h.slots}" for h in plan.hosts)
        raise UsageError(f"the hosts have different slot counts ({listed}); every node runs the same number "
                         "of workers.", "give every host the same slots (or use --gpus N).")
    slots = counts.pop() if counts else None
    if slots is not None and gpus is not None and slots != gpus:
        raise UsageError(f"--gpus {gpus} but the hosts have {slots} slots each.", "drop one of them.")
    return slots if slots is not None else gpus


def ssh_name(name: str) -> str:
    """What ssh takes: ``[fe80::1]`` without its brackets (``user@`` kept)."""
    user, at, host = name.rpartition("@")
    return f"{user}{at}{host[1:-1]}" if host.startswith("[") else name
