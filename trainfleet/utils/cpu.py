"""What this CPU does natively: bf16 without native instructions is emulated, ~45x slower than fp32."""
from __future__ import annotations

from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX-512 BF16, AMX), Arm ("bf16" in Features)


def bf16_emulated(cpuinfo: str | None = None) -> str | None:
    """Why bf16 on this CPU is emulated, naming the flags it has, or None when it is native
    (or when /proc/cpuinfo cannot tell)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags or any(flag in flags for flag in BF16_FLAGS):
        return None
    vector = sorted(f for f in flags if f.startswith(("avx", "sve", "asimd"))) or ["no vector extensions"]
    return (f"bf16 is emulated on this CPU (flags: {' '.join(vector)}; none of {', '.join(BF16_FLAGS)}), "
            "about 45x slower than fp32: its timing would say nothing about trainfleet")
