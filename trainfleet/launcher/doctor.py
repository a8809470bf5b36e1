"""``trainfleet doctor``: the pre-flight checks of a launch, one line each, then a real all-reduce."""
from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

from trainfleet.launcher.config import LaunchConfig
from trainfleet.launcher.network import reserve_port
from trainfleet.utils.errors import UsageError

PROBE = "trainfleet.launcher.doctor_probe"  # the module the test job runs: one all-reduce


def stale_workers() -> list[str]:
    """Workers of earlier trainfleet/torchrun runs whose launcher is gone (adopted by init)."""
    from trainfleet.utils.process import processes_with

    found = []
    for pid, parent in sorted(processes_with("TORCHELASTIC_RUN_ID").items()):
        if parent == 1:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            found.append(f"pid {pid} ({command[:60]})")
    return found


def checks(cfg: LaunchConfig) -> list[tuple[bool, str]]:
    """(passed, line) for each check that needs no other node."""
    node = cfg.node_rank or 0
    results: list[tuple[bool, str]] = []
    try:
        address = socket.gethostbyname(cfg.master_addr)
        results.append((True, f"master address {cfg.master_addr} resolves to {address}"))
    except OSError as err:
        return [(False, f"node {node}: master address {cfg.master_addr} does not resolve ({err})")]
    if node == 0 and cfg.master_port:
        try:
            reserve_port(cfg.master_addr, cfg.master_port).close()
            results.append((True, f"port {cfg.master_port} on {cfg.master_addr} is free"))
        except UsageError as err:
            results.append((False, f"node 0: {err}"))
    elif node > 0:
        try:
            socket.create_connection((cfg.master_addr, cfg.master_port or 0), timeout=5).close()
            results.append((True, f"master {cfg.master_addr}:{cfg.master_port} is reachable"))
        except OSError as err:
            results.append((False, f"node {node}: master {cfg.master_addr}:{cfg.master_port} is unreachable "
                                   f"({err.strerror or err}); start node 0's doctor (or job) first"))
    stale = stale_workers()
    results.append((not stale, "no stale workers of earlier runs" if not stale else
                    f"node {node}: stale workers of an earlier run: {', '.join(stale)}; kill them"))
    return results


def doctor(cfg: LaunchConfig) -> int:
    """Print each check; then run a tiny job of the same layout whose ranks all-reduce once.

    Layout agreement between nodes is part of every launch's pre-flight, so the job
    checks it too. Returns 0 when everything passed, else 1.
    """
    from trainfleet.launcher.launch import launch  # the entry point sits above this helper

    passed = True
    for ok, line in checks(cfg):
        print(f"doctor: [{'ok' if ok else 'FAIL'}] {line}", flush=True)
        passed &= ok
    if not passed:
        return 1
    probe = dataclasses.replace(cfg, target=PROBE, module=True, args=[],
                                rendezvous_timeout=min(cfg.rendezvous_timeout, 60))
    code = launch(probe)
    if code != 0:
        print(f"doctor: [FAIL] the all-reduce job exited with {code}", flush=True)
    return 0 if code == 0 else 1
