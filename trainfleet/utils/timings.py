"""The per-rank step-time table: written by node 0's agent as ``timings.json`` beside the logs
(``launcher/diagnosis.py``), printed at the end of a job and by ``trainfleet status`` for a
submitted one. The file is read as untrusted input: a value that is not what it should be shows
as "-", never as an error."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PHASES = ("data", "forward", "backward", "optimizer", "collective", "checkpoint", "idle")
FILE = "timings.json"


def _ms(value: Any) -> str:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return f"{value * 1000:.1f}" if ok else "-"


def timing_table(ranks: dict[Any, Any], window: int = 20) -> list[str]:
    """Every rank's median step and phases (ms) over its last ``window`` steps."""
    rows = []
    for rank, info in ranks.items():
        if str(rank).isdigit() and isinstance(info, dict) and isinstance(info.get("med"), dict) and info.get("n"):
            rows.append((int(rank), info))
    if not rows:
        return []
    head = f"{'rank':>4} {'host':<16} {'steps':>6} {'step':>8} " + " ".join(f"{p:>10}" for p in PHASES)
    lines = [f"per-rank step time, ms (median of the last {window} steps):", head]
    for rank, info in sorted(rows, key=lambda row: row[0]):
        med = info["med"]
        host = "".join(c if c.isprintable() else "?" for c in str(info.get("host", "?")))[:16]
        steps = info.get("step") if isinstance(info.get("step"), int) else "-"
        cells = " ".join(f"{_ms(med.get(p)):>10}" for p in PHASES)
        lines.append(f"{rank:>4} {host:<16} {steps:>6} {_ms(med.get('step')):>8} {cells}")
    return lines


def write_timings(folder: Path, ranks: dict[int, Any]) -> None:
    """``folder/timings.json``, replaced atomically (``trainfleet status`` may read it meanwhile)."""
    path = Path(folder) / FILE
    tmp = path.with_name(f".{FILE}.tmp")
    tmp.write_text(json.dumps({str(rank): info for rank, info in ranks.items()}, indent=1))
    tmp.replace(path)


def read_timings(folder: Path) -> dict[str, Any]:
    """What ``folder/timings.json`` holds, or {} (absent, unreadable, not a table)."""
    try:
        data = json.loads((Path(folder) / FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
