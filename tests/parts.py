"""The optional parts some tests need, and whether this machine has them.

A test declares what it needs with a marker (``horovod``, ``slurm``, ``multinode``,
``ssh``, ``gpu`` or ``gpu(devices=N)``); conftest.py decides what a missing part means. On a
developer's machine the test is skipped with the reason. Under ``scripts/test.sh`` (and so
CI) ``TRAINFLEET_REQUIRE`` names the parts that must be there: a test that needs a missing
one fails, and so does any other skip, so nothing the README claims goes unchecked quietly.
"""
from __future__ import annotations

import os
import shutil

from tests import twohosts

PARTS = ("horovod", "slurm", "multinode", "ssh", "gpu")
REQUIRE_ENV = "TRAINFLEET_REQUIRE"


def horovod_missing() -> str | None:
    try:
        import horovod.torch  # noqa: F401
    except ImportError as err:
        return f"Horovod is not importable ({err}): run scripts/build-horovod.sh"
    return None


def slurm_missing() -> str | None:
    if not os.environ.get("SLURM_CONF"):
        return "no SLURM cluster (SLURM_CONF unset): run `eval \"$(scripts/dev-slurm.sh start)\"`"
    for tool in ("sbatch", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            return f"no SLURM cluster ({tool} not on PATH): run `eval \"$(scripts/dev-slurm.sh start)\"`"
    return None


def multinode_missing() -> str | None:
    return twohosts.available()


def ssh_missing() -> str | None:
    from tests import sshhosts

    return sshhosts.available()


def gpu_missing(devices: int = 1) -> str | None:
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found == 0:
        return "no CUDA device"
    if found < devices:
        return f"needs {devices} CUDA devices, this machine has {found}"
    return None


CHECKS = {"horovod": horovod_missing, "slurm": slurm_missing, "multinode": multinode_missing,
          "ssh": ssh_missing, "gpu": gpu_missing}


def required() -> set[str]:
    """The parts ``TRAINFLEET_REQUIRE`` names (comma-separated; ``all`` for every part)."""
    names = {n.strip() for n in os.environ.get(REQUIRE_ENV, "").split(",") if n.strip()}
    if "all" in names:
        return set(PARTS)
    unknown = names - set(PARTS)
    if unknown:
        raise ValueError(f"{REQUIRE_ENV}={os.environ[REQUIRE_ENV]!r} names {sorted(unknown)}; "
                         f"expected some of {list(PARTS)} or 'all'")
    return names


def strict() -> bool:
    """True when skips are failures (``TRAINFLEET_REQUIRE`` is set, as scripts/test.sh does)."""
    return bool(os.environ.get(REQUIRE_ENV, "").strip())
