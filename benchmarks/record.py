"""Run a benchmark command and keep its raw output, with what it ran on, under docs/measurements/.

    python -m benchmarks.record NAME -- COMMAND [ARGS...]
    e.g. python -m benchmarks.record faults -- python -m benchmarks.faults --trials 10 --cap 20

The file starts with the command, the date, the commit, the CPU (model, cores, the flags that
decide bf16 speed) and the torch version, then the output as printed. The README's tables
quote these files; rerunning the command in the header reproduces one.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO

OUT = REPO / "docs" / "measurements"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> list[str]:
    """One line each: CPU model, cores, the vector flags that matter here, Python and torch."""
    model, flags = platform.processor() or "?", set()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    for line in info:  # the first processor's entries
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("?", platform.processor()):
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip() or "not importable"
    have = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in FLAGS)
    return [f"cpu: {model}; {os.cpu_count()} cores; {have}",
            f"python {platform.python_version()}; torch {torch_version}; {platform.platform()}"]


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    # the measurement files themselves do not count: several are recorded one after another
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!docs/measurements"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    return (head.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the file to write: docs/measurements/NAME.txt")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or "/" in args.name:
        parser.error("expected NAME -- COMMAND [ARGS...], NAME without a slash")
    started, wall, revision = datetime.datetime.now(datetime.timezone.utc), time.monotonic(), commit()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    code = process.wait()
    header = [f"$ {shlex.join(command)}",
              f"date: {started:%Y-%m-%d %H:%M} UTC; took {time.monotonic() - wall:.0f} s; exit code {code}",
              f"commit: {revision}", *machine(), ""]
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.name}.txt"
    path.write_text("\n".join(header) + "\n" + "".join(lines))
    print(f"recorded in {path.relative_to(REPO)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
