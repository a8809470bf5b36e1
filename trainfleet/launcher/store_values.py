"""What the control store holds, read as untrusted input: the :class:`Failure` record every agent
posts, and a parser for every other value an agent reads. A parser returns None for a value that
is not what the key holds (anything that reaches the master's port can write one); the control
thread then ignores it, with one line."""
from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Failure:
    """The first failure of a job, as every agent reports it."""

    node: int
    rank: int | None
    how: str
    lines: list[str] = field(default_factory=list)
    local_rank: int | None = None
    elapsed: float | None = None  # seconds from the worker's start to its failure
    at: float = field(default_factory=time.time)  # wall clock: the earliest failure is the cause
    secondary: bool = False  # it failed because a peer went away (connection reset/closed)
    why: str = ""  # what the log says beyond the exit code (NCCL's watchdog)
    report: bool = False  # ``lines`` are a diagnosis (a hang, a desync), not the tail of the rank's log

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Failure":
        """A failure read from the store.

        Raises:
            ValueError: not a failure record (wrong JSON, unknown fields, wrong types).
        """
        data = json.loads(text)
        fields = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or set(data) - fields or not {"node", "rank", "how"} <= set(data):
            raise ValueError("not a failure record")
        for name, kinds in _FAILURE_TYPES.items():
            value = data.get(name)
            if name in data and (not isinstance(value, kinds)
                                 or (name not in ("secondary", "report") and isinstance(value, bool))):
                raise ValueError(f"{name}: {type(value).__name__}")
        if not all(isinstance(line, str) for line in data.get("lines", [])):
            raise ValueError("lines: not text")
        data["lines"] = [printable(line) for line in data.get("lines", [])[-50:]]
        data["how"], data["why"] = printable(data["how"]), printable(data.get("why", ""))
        return cls(**data)

    def exit_code(self) -> int:
        """Every agent exits with the failing rank's code (128 + signal when it was killed)."""
        words = self.how.split()
        if self.how.startswith("exit code") and len(words) > 2 and words[2].isdigit():
            return min(int(words[2]), 255) or 1
        if self.how.startswith("signal SIG") and len(words) > 1 and words[1] in signal.Signals.__members__:
            return 128 + signal.Signals[words[1]].value
        return 1


_FAILURE_TYPES = {"node": int, "rank": (int, type(None)), "how": str, "lines": list, "local_rank": (int, type(None)),
                  "elapsed": (int, float, type(None)), "at": (int, float), "secondary": (bool, int), "why": str,
                  "report": bool}
# The signals the launcher relays to every worker; a job/signal naming another is not ours.
RELAYED = tuple(int(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))


def printable(text: str, limit: int = 1000) -> str:
    """``text`` without control characters (a store value may carry terminal escapes), cut to ``limit``."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text)[:limit])


def parse_signal(text: bytes) -> tuple[int, int] | None:
    """``job/signal``: ``"ATTEMPT SIGNUM"`` with a relayed signal, else None."""
    parts = text.decode(errors="replace").split()
    if len(parts) != 2 or not all(part.isdigit() for part in parts) or int(parts[1]) not in RELAYED:
        return None
    return int(parts[0]), int(parts[1])


def parse_count(text: bytes, limit: int = 1_000_000) -> int | None:
    """A small non-negative integer (an attempt number, a counter), else None."""
    raw = text.decode(errors="replace").strip()
    return int(raw) if raw.isdigit() and int(raw) <= limit else None


def _json(text: bytes) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_dict(text: bytes) -> dict | None:
    """A JSON object (a node's layout), else None."""
    value = _json(text)
    return value if isinstance(value, dict) else None


def parse_ports(text: bytes) -> tuple[int, int | None] | None:
    """``attempt/<n>/ports``: the workers' store port and Horovod's (or null), else None."""
    ports = _json(text)
    valid = (isinstance(ports, list) and len(ports) == 2 and ports[0] is not None
             and all(p is None or (isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536) for p in ports))
    return (ports[0], ports[1]) if valid else None


def parse_members(text: bytes, nodes: int) -> list[int] | None:
    """``members/<attempt>``: distinct node ids 0..nodes-1 with node 0 first, else None."""
    members = _json(text)
    ok = (isinstance(members, list) and members and members[0] == 0 and len(set(map(str, members))) == len(members)
          and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < nodes for n in members))
    return members if ok else None


PEER_ERRORS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
               "Connection refused", "NCCL communicator was aborted", "remote process exited")


def peer_error(lines: list[str]) -> bool:
    """True when the log ends in an error caused by a peer going away."""
    return any(marker in line for line in lines[-5:] for marker in PEER_ERRORS)


def failed_at(error_file: str) -> float:
    """When the worker raised (its error file's timestamp), else now."""
    try:
        return float(json.loads(Path(error_file).read_text())["timestamp"])
    except (OSError, ValueError, KeyError):
        return time.time()
