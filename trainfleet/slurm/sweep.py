"""Job arrays and sweeps: ``--sweep key=v1,v2`` (repeatable, cartesian) and ``--array N``.

Each array task gets its index and its own values. A value reaches the script as
``--key value`` appended to its arguments, unless an argument holds the ``{key}``
placeholder, which is then substituted instead; ``{index}`` is always substituted.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Sequence

from trainfleet.utils.errors import UsageError

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ArrayTask:
    """One task of a job array: its index and the sweep values it runs with."""

    index: int
    values: dict[str, str] = field(default_factory=dict)

    def script_args(self, args: Sequence[str]) -> list[str]:
        """``args`` with this task's placeholders filled and its other values appended."""
        out = [arg.replace("{index}", str(self.index)) for arg in args]
        appended: list[str] = []
        for key, value in self.values.items():
            placeholder = "{" + key + "}"
            if any(placeholder in arg for arg in args):
                out = [arg.replace(placeholder, value) for arg in out]
            else:
                appended += [f"--{key}", value]
        return out + appended

    def label(self) -> str:
        """``lr=0.1 bs=32`` (or ``-`` without values), for status tables."""
        return " ".join(f"{k}={v}" for k, v in self.values.items()) or "-"


def parse_sweep(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["lr=0.1,0.01", "bs=32,64"]`` -> ``{"lr": ["0.1", "0.01"], "bs": ["32", "64"]}``.

    Raises:
        UsageError: a spec without ``=``, a bad key, an empty value or a repeated key.
    """
    sweep: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise UsageError(f"--sweep {spec!r} is malformed: expected key=value1,value2,...",
                             "e.g. --sweep lr=0.1,0.01 (keys are option names without the dashes).")
        values = [v.strip() for v in raw.split(",")]
        if not raw.strip() or any(not v for v in values):
            raise UsageError(f"--sweep {spec!r} has an empty value: expected key=value1,value2,...",
                             "remove the stray comma, or quote values that contain spaces.")
        if key in sweep:
            raise UsageError(f"--sweep {key!r} is given twice.", f"list every value once: --sweep {key}=a,b,c.")
        sweep[key] = values
    return sweep


def array_tasks(sweep: dict[str, list[str]], repeats: int | None) -> list[ArrayTask]:
    """The tasks of a submission: the cartesian product of the sweep, each repeated
    ``repeats`` times (``--array N``); one task without values when neither is given."""
    if repeats is not None and repeats < 1:
        raise UsageError(f"--array {repeats}: expected at least 1 task.")
    keys = list(sweep)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]
    tasks = [values for values in combos for _ in range(repeats or 1)]
    return [ArrayTask(index, values) for index, values in enumerate(tasks)]
