"""hosts_first_step_vs_ssh_torchrun: from one command to rank 0's first step on 2 hosts x 2 workers.

The hosts are two network namespaces, each with its own address and sshd (tests/sshhosts.py).
Ours: `launch --hosts A:2,B:2` run on host A. The peer is what people write without a
launcher that starts hosts: a shell script on A that starts torchrun for node 0 there and,
over the same ssh, torchrun for node 1 on B (static rendezvous), then waits for both. Both run
the same probe (benchmarks/probes/first_step.py). Target: <= 1.0. Needs root, iproute2 and
openssh-server.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BIN, PROBES, Comparison, cleans_up, interleave, now, rounds_from_args, scratch
from tests import sshhosts

PROBE = str(PROBES / "first_step.py")
PORTS = iter(range(29561, 29761))  # a fresh master port per run: a just-closed one may linger in TIME_WAIT


LINGER_S = 30
LINGERED = {"ours": 0, "peer": 0}


def _first_step(out: Path, started: float, process: subprocess.Popen, hosts: sshhosts.SshHosts, side: str) -> float:
    """Seconds to rank 0's first step. A run still going LINGER_S after it is stopped and counted
    (torchrun's agents can wait in their exit barrier for minutes), and both hosts are cleared."""
    record = out / "first_step.json"
    deadline, stepped = time.monotonic() + 300, None
    while process.poll() is None and time.monotonic() < deadline:
        if stepped is None and record.is_file():
            stepped = time.monotonic()
        if stepped is not None and time.monotonic() - stepped > LINGER_S:
            LINGERED[side] += 1
            break
        time.sleep(0.1)
    if process.poll() is None:
        for host in (0, 1):
            for pid in hosts.pids(host):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    if not record.is_file():
        raise RuntimeError(f"{side} run failed ({process.returncode}): {stderr[-2000:]}")
    elapsed = json.loads(record.read_text())["t"] - started
    shutil.rmtree(out)
    return elapsed


def _ours(hosts: sshhosts.SshHosts) -> float:
    out = scratch()
    command = [str(BIN / "launch"), "--hosts", f"{hosts.addrs[0]}:2,{hosts.addrs[1]}:2", "--ssh-opt",
               hosts.ssh_opts(), "--master-port", str(next(PORTS)), PROBE, str(out)]
    started = now()
    return _first_step(out, started, hosts.popen(0, command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                   text=True), hosts, "ours")


def _peer(hosts: sshhosts.SshHosts) -> float:
    out, port = scratch(), next(PORTS)
    torchrun = lambda node, iface: (f"GLOO_SOCKET_IFNAME={iface} {BIN / 'torchrun'} --nnodes 2 --node-rank {node} "
                                    f"--nproc-per-node 2 --master-addr {hosts.addrs[0]} --master-port {port} "
                                    f"{PROBE} {out}")
    remote = f"cd {shlex.quote(str(Path.cwd()))} && {torchrun(1, hosts.links[1])}"
    script = (f"{torchrun(0, hosts.links[0])} & ssh {hosts.ssh_opts()} {hosts.addrs[1]} {shlex.quote(remote)} & "
              "wait")
    started = now()
    return _first_step(out, started, hosts.popen(0, ["bash", "-c", script], stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.PIPE, text=True), hosts, "peer")


@cleans_up
def main(argv: list[str] | None = None) -> None:
    rounds = rounds_from_args(__doc__, argv, rounds=5, quick=3)
    reason = sshhosts.available()
    if reason is not None:
        print(f"hosts_first_step_vs_ssh_torchrun: skipped ({reason})", flush=True)
        return
    folder = Path(tempfile.mkdtemp(prefix="trainfleet-hosts-"))
    try:
        with sshhosts.SshHosts(folder) as hosts:
            comparison = interleave(rounds, lambda: _ours(hosts), lambda: _peer(hosts),
                                    Comparison("hosts_first_step_vs_ssh_torchrun", target=1.0))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(comparison.line(), flush=True)
    print(f"  runs stopped {LINGER_S} s after their first step because they had not ended: "
          f"ours {LINGERED['ours']}, peer {LINGERED['peer']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
