"""Two 'hosts' on one machine: network namespaces joined by a veth pair, with private addresses.

Only the namespaces created here are ever talked to. Needs root and iproute2.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time


FAULTS = ("kill -9 worker", "kill -STOP worker", "kill -9 agent", "link down")


def available() -> str | None:
    """None when two-host tests can run, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (apt-get install iproute2)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _bring_up(name: str, link: str, addr: str) -> None:
    """Give namespace ``name`` its address on ``link`` and bring the link and loopback up."""
    _ip("-n", name, "addr", "add", f"{addr}/24", "dev", link)
    _ip("-n", name, "link", "set", link, "up")
    _ip("-n", name, "link", "set", "lo", "up")


class _Namespaces:
    names: tuple[str, ...]

    def popen(self, host: int, command: list[str], **kwargs) -> subprocess.Popen:
        """Start ``command`` inside host ``host``; `ip netns exec` execs, so the pid is the command's."""
        return subprocess.Popen(["ip", "netns", "exec", self.names[host], *command], **kwargs)

    def pids(self, host: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.names[host]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


class TwoHosts(_Namespaces):
    """Namespaces A (10.231.N.1) and B (10.231.N.2) on one link that a test can cut."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.names = (f"tfa{tag}", f"tfb{tag}")
        self.links = (f"tva{tag}", f"tvb{tag}")
        subnet = 10 + os.getpid() % 240
        self.addrs = (f"10.231.{subnet}.1", f"10.231.{subnet}.2")

    def __enter__(self) -> "TwoHosts":
        (a, b), (va, vb) = self.names, self.links
        for name in self.names:
            _ip("netns", "add", name)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        for link, name, addr in ((va, a, self.addrs[0]), (vb, b, self.addrs[1])):
            _ip("link", "set", link, "netns", name)
            _bring_up(name, link, addr)
        return self

    def cut(self) -> None:
        """Take the link down on host A: both sides stop hearing each other."""
        _ip("-n", self.names[0], "link", "set", self.links[0], "down")

    def inject(self, fault: str, worker_pids: dict[int, int], agents: list[subprocess.Popen]) -> None:
        """One of FAULTS, on host B's side: its rank 3, its agent, or the link."""
        if fault == "kill -9 worker":
            os.kill(worker_pids[3], signal.SIGKILL)
        elif fault == "kill -STOP worker":
            os.kill(worker_pids[3], signal.SIGSTOP)
        elif fault == "kill -9 agent":
            os.kill(agents[1].pid, signal.SIGKILL)
        elif fault == "link down":
            self.cut()
        else:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")

    def leftovers(self, wait: float = 3.0) -> list[int]:
        """Processes still running in either namespace after up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            left = self.pids(0) + self.pids(1)
            if not left:
                return []
            time.sleep(0.1)
        return self.pids(0) + self.pids(1)

    def __exit__(self, *exc) -> None:
        for host in (0, 1):
            for pid in self.pids(host):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.2)
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def wait_ready(tmp_path, ranks=4, timeout=90):
    """The pids of ranks 0..ranks-1 once each has written ready.rank<R> (long_train.py)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # a file can exist before its pid is in it (the suite once read it empty: IndexError)
            return {r: int((tmp_path / f"ready.rank{r}").read_text().split()[0]) for r in range(ranks)}
        except (OSError, IndexError, ValueError):
            time.sleep(0.1)
    raise AssertionError("the job did not start")


class ManyHosts(_Namespaces):
    """N 'hosts' (namespaces, 10.232.S.1..N) on one switch: a bridge in a namespace of its own.

    ``cut(h)`` takes host h's cable out (its end of the veth goes down): h and the others
    stop hearing each other, while the others still hear one another.
    """

    def __init__(self, count: int) -> None:
        tag = f"{os.getpid() % 100000}"
        self.count = count
        self.switch = f"tfsw{tag}"
        self.names = tuple(f"tfh{i}{tag}" for i in range(count))
        self.links = tuple(f"tvh{i}{tag}" for i in range(count))
        subnet = 10 + os.getpid() % 240
        self.addrs = tuple(f"10.232.{subnet}.{i + 1}" for i in range(count))

    def __enter__(self) -> "ManyHosts":
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (name, link, addr) in enumerate(zip(self.names, self.links, self.addrs)):
            _ip("netns", "add", name)
            _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}s")
            _ip("link", "set", link, "netns", name)
            _ip("link", "set", f"{link}s", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"{link}s", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"{link}s", "up")
            _bring_up(name, link, addr)
        return self

    def cut(self, host: int) -> None:
        _ip("-n", self.names[host], "link", "set", self.links[host], "down")

    def leftovers(self, wait: float = 3.0) -> list[int]:
        deadline = time.monotonic() + wait
        while True:
            left = [pid for host in range(self.count) for pid in self.pids(host)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        for host in range(self.count):
            for pid in self.pids(host):
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.2)
        for name in (*self.names, self.switch):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
