"""A node's agent started by ``launch --hosts`` (locally or over ssh): ``python -m trainfleet.launcher.remote``.

Reads one JSON line on stdin (``config``: the LaunchConfig with this node's rank, ``env``: the
forwarded variables, ``cwd``), then runs the node's agent. stdin stays open: a ``signal N``
line is relayed as that signal; end-of-file (the launcher or the ssh connection is gone) is a
SIGTERM, which stops this node and, through the control plane, the job.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

from trainfleet.utils.errors import UsageError


def _lines(fd: int):
    """Lines read from ``fd`` with os.read: no Python-level lock is held while it waits, so the
    agent can fork its workers while this runs on another thread (a thread blocked in
    ``sys.stdin.readline`` holds the buffer's lock, and a forked worker touching stdin deadlocks)."""
    pending = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line.decode()


def _watch(lines) -> None:
    for line in lines:
        word, _, number = line.strip().partition(" ")
        if word == "signal" and number.isdigit():
            os.kill(os.getpid(), int(number))
    os.kill(os.getpid(), signal.SIGTERM)  # end-of-file: the launcher or the ssh connection is gone


def main() -> int:
    channel = os.dup(0)  # not inherited by workers' exec; fd 0 becomes /dev/null for everything else
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    lines = _lines(channel)
    first = next(lines, None)
    if first is None:
        return 2
    spec = json.loads(first)
    os.environ.update(spec["env"])
    os.chdir(spec["cwd"])
    threading.Thread(target=_watch, args=(lines,), name="trainfleet-stdin", daemon=True).start()
    from trainfleet.launcher.config import LaunchConfig
    from trainfleet.launcher.launch import launch

    try:
        return launch(LaunchConfig(**spec["config"]))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
