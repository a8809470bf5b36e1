"""The job's ledger file (``ledger.json`` beside the logs, written by node 0's agent:
``launcher/ledger.py``): its rows, and the table printed at the end of a job and by ``trainfleet
status``. The file is read as untrusted input: a value that is not a number counts as 0, never as
an error."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FILE = "ledger.json"
# (key, label): the table's rows, in order
ROWS = (
    ("productive", "training steps (productive)"),
    ("startup", "start-up (processes, imports, rendezvous)"),
    ("first_step", "first step / compile"),
    ("save", "checkpoint stalls (saves)"),
    ("load", "checkpoint loads"),
    ("eval", "evaluation"),
    ("detection", "failure detection"),
    ("teardown", "teardown"),
    ("restart", "restarts and recoveries"),
    ("requeue", "requeue waits"),
    ("recomputed", "recomputed steps"),
    ("idle", "idle / unaccounted"),
)
KEYS = tuple(key for key, _ in ROWS)


def _seconds(value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return float(value) if ok else 0.0


def table(result: dict[str, Any]) -> list[str]:
    """The ledger as lines: each row's seconds and share of the wall time, then the goodput."""
    wall = _seconds(result.get("wall"))
    rows = result.get("rows") if isinstance(result.get("rows"), dict) else {}
    runs = result.get("runs") if isinstance(result.get("runs"), int) else 1
    head = f"where the {wall:.1f}s went" + (f" (over {runs} runs of this SLURM job)" if runs > 1 else "") + ":"
    lines = [head]
    for key, label in ROWS:
        seconds = _seconds(rows.get(key))
        if seconds < 0.005 and key not in ("productive", "idle"):
            continue
        share = 100 * seconds / wall if wall > 0 else 0.0
        extra = ""
        again = result.get("recomputed_steps")
        if key == "recomputed" and isinstance(again, int) and again > 0:
            extra = f"  ({again} step(s) computed again)"
        lines.append(f"  {label:<42} {seconds:>9.2f}s {share:>6.1f}%{extra}")
    goodput = min(_seconds(result.get("goodput")), 1.0)
    lines.append(f"  {'goodput (productive / wall)':<42} {100 * goodput:>17.1f}%")
    if result.get("itemised") is False:
        lines.append("  (the script does not use trainfleet's Engine: its workers' time is not itemised)")
    return lines


def read(folder: Path) -> dict[str, Any] | None:
    """A job's ledger from its log folder (``trainfleet status``), or None."""
    try:
        result = json.loads((Path(folder) / FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), dict):
        return None
    if not isinstance(result.get("wall"), (int, float)):
        return None
    return result
