"""Fault to last agent's exit, two 'hosts' (network namespaces), trainfleet against torchrun.

    python -m benchmarks.faults [--trials 10] [--torchrun-trials 10] [--cap 60]

Each trial starts a 2 x 2 job (one agent per namespace), waits until every rank trains,
injects the fault and times until the last agent has exited. torchrun needs
GLOO_SOCKET_IFNAME set to start at all here (gloo resolves the hostname to 127.0.0.1);
it is given it. A torchrun trial still running after --cap seconds is stopped and
counted as "> cap" (its collectives would wait for the 30-minute default timeout).
Needs root and iproute2.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import BIN, REPO, cleans_up
from tests import twohosts

SCRIPT = str(REPO / "tests" / "scripts" / "long_train.py")
FAULTS = twohosts.FAULTS


def _command(tool: str, node: int, addr: str, out: Path) -> list[str]:
    if tool == "trainfleet":
        return [str(BIN / "launch"), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2",
                "--master-addr", addr, "--master-port", "29555", "--log-dir", str(out / "logs"), SCRIPT, str(out)]
    return [str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2",
            "--master-addr", addr, "--master-port", "29555", SCRIPT, str(out)]


def trial(tool: str, fault: str, cap: float) -> float:
    """Seconds from the fault to the last agent's exit (``cap`` when it did not exit)."""
    out = Path(tempfile.mkdtemp(prefix="trainfleet-fault-"))
    try:
        with twohosts.TwoHosts() as hosts:
            agents = []
            for node in (0, 1):
                env = dict(os.environ)
                if tool == "torchrun":
                    env["GLOO_SOCKET_IFNAME"] = hosts.links[node]
                agents.append(hosts.popen(node, _command(tool, node, hosts.addrs[0], out), env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 120
            while not all((out / f"ready.rank{r}").exists() for r in range(4)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{tool}: the job did not start")
                time.sleep(0.1)
            pids = {r: int((out / f"ready.rank{r}").read_text().split()[0]) for r in range(4)}
            time.sleep(1.0)
            start = time.monotonic()
            hosts.inject(fault, pids, agents)
            while any(a.poll() is None for a in agents) and time.monotonic() - start < cap:
                time.sleep(0.02)
            return min(time.monotonic() - start, cap)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@cleans_up
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--torchrun-trials", type=int, default=10)
    parser.add_argument("--cap", type=float, default=60.0)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--quick", action="store_true", help="2 trials each, cap 20 s")
    parser.add_argument("--smoke", action="store_true", help="1 trial of kill -9 worker each")
    args = parser.parse_args(argv)
    if twohosts.available():
        print(f"faults: skipped ({twohosts.available()})")
        return
    faults = args.faults.split(",")
    if args.smoke:
        args.trials = args.torchrun_trials = 1
        faults = ["kill -9 worker"]
    elif args.quick:
        args.trials, args.torchrun_trials, args.cap = 2, 2, 20.0
    for fault in faults:
        ours = [trial("trainfleet", fault, args.cap) for _ in range(args.trials)]
        peer = [trial("torchrun", fault, args.cap) for _ in range(args.torchrun_trials)]
        fmt = lambda xs: (f"median {statistics.median(xs):.2f}s, max {max(xs):.2f}s, n={len(xs)}"
                          + (f" ({sum(x >= args.cap for x in xs)} hit the {args.cap:.0f}s cap)"
                             if any(x >= args.cap for x in xs) else ""))
        print(f"fault '{fault}': trainfleet {fmt(ours)} | torchrun {fmt(peer)}", flush=True)


if __name__ == "__main__":
    main()
