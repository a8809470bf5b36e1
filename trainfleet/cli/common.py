"""What every command shares: a parser that fails in one line, and the guard that turns bad
input into that line and exit status 2."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from trainfleet.utils.errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as one line (what, expected, hint) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}. HINT: see `{self.prog} --help`.", file=sys.stderr)
        raise SystemExit(2)


def guarded(run: Callable[[], int]) -> int:
    """Run a command; a UsageError becomes one line on stderr and exit status 2."""
    try:
        return run()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, like a shell tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def exit_now(code: int | None) -> None:
    """End the process with ``code`` once its exit handlers ran and its output is out, skipping
    the interpreter's own finalization: with torch loaded that takes about 0.6 s, which a job's
    ledger (launcher/ledger.py) could not count and a user waits for. Only for console scripts."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0 if code is None else code if isinstance(code, int) else 1)


def csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse type for comma lists: ``1,2`` -> ``[1, 2]``."""
    def parse(text: str) -> list[Any]:
        return [kind(part) for part in text.split(",") if part]

    return parse
