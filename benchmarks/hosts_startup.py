"""hosts_first_step_vs_ssh_torchrun: from one command to rank 0's first step on 2 hosts x 2 workers.

The hosts are two network namespaces, each with its own address and sshd (tests/sshhosts.py).
Ours: `launch --hosts A:2,B:2` run on host A. The peer is what people write without a
launcher that starts hosts: a shell script on A that starts torchrun for node 0 there and,
over the same ssh, torchrun for node 1 on B (static rendezvous), then waits for both. Both run
the same probe (benchmarks/probes/first_step.py). Target: <= 1.0. Needs root, iproute2 and
openssh-server.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import BIN, PROBES, Comparison, interleave, now, paired_verdict, rounds_from_args, scratch
from tests import sshhosts

PROBE = str(PROBES / "first_step.py")
PORTS = iter(range(29561, 29761))  # a fresh master port per run: a just-closed one may linger in TIME_WAIT


def _first_step(out: Path, started: float, process: subprocess.Popen) -> float:
    _, stderr = process.communicate(timeout=300)
    record = out / "first_step.json"
    if process.returncode != 0 or not record.is_file():
        raise RuntimeError(f"run failed ({process.returncode}): {stderr[-2000:]}")
    elapsed = json.loads(record.read_text())["t"] - started
    shutil.rmtree(out)
    return elapsed


def _ours(hosts: sshhosts.SshHosts) -> float:
    out = scratch()
    command = [str(BIN / "launch"), "--hosts", f"{hosts.addrs[0]}:2,{hosts.addrs[1]}:2", "--ssh-opt",
               hosts.ssh_opts(), "--master-port", str(next(PORTS)), PROBE, str(out)]
    started = now()
    return _first_step(out, started, hosts.popen(0, command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                   text=True))


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
                                                   stderr=subprocess.PIPE, text=True))


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
    if len(comparison.ours) > 1:
        print("  " + paired_verdict(comparison), flush=True)


if __name__ == "__main__":
    sys.exit(main())
