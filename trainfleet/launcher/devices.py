"""Count CUDA devices without importing torch or initialising CUDA.

The launcher forks its workers after importing torch; a CUDA context created in
the launcher would poison every forked child ("Cannot re-initialize CUDA in forked
subprocess"), and importing torch just to count devices would slow every launch.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Mapping

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
DEV = Path("/dev")


def physical_cuda_devices(proc: Path = NVIDIA_PROC, dev: Path = DEV) -> int:
    """GPUs this process can open (0 without a driver). The driver lists every GPU of the host
    under ``proc``, also in a container given only some of them: a GPU counts when its device
    node (``/dev/nvidia<minor>``, the minor from its ``information`` file) exists here."""
    if proc.is_dir():
        return sum(1 for gpu in proc.iterdir() if _openable(gpu / "information", dev))
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return 0
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return 0


def _openable(information: Path, dev: Path) -> bool:
    try:
        text = information.read_text()
    except OSError:
        return True  # no minor to check: trust the driver's list
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Device Minor" and value.strip().isdigit():
            node = dev / f"nvidia{int(value)}"
            return node.exists() and os.access(node, os.R_OK | os.W_OK)
    return True


def visible_cuda_devices(env: Mapping[str, str] | None = None, physical: int | None = None) -> int:
    """Devices a process would see, honouring CUDA_VISIBLE_DEVICES.

    Args:
        env: the environment (os.environ when None).
        physical: the host's GPU count (probed when None).
    """
    env = os.environ if env is None else env
    physical = physical_cuda_devices() if physical is None else physical
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return physical
    count = 0
    for entry in mask.split(","):
        entry = entry.strip()
        # CUDA stops at the first invalid entry, e.g. "-1" hides every device.
        if not entry or entry.startswith("-"):
            break
        if entry.isdigit() and int(entry) >= physical:
            break
        count += 1
    return min(count, physical) if physical else 0


def visible_devices_for(count: int, env: Mapping[str, str] | None = None, start: int = 0) -> str:
    """The CUDA_VISIBLE_DEVICES value that keeps ``count`` of the visible devices from the
    ``start``-th on (a simulated node n of ``count`` GPUs takes ``start = n * count``)."""
    env = os.environ if env is None else env
    mask = env.get("CUDA_VISIBLE_DEVICES")
    current = [e.strip() for e in mask.split(",")] if mask else [str(i) for i in range(start + count)]
    return ",".join(current[start:start + count])
