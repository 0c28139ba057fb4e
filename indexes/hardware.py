"""What this machine's CPU multiplies natively: the precision a scan is fast in depends on it.

A CPU with AVX-512 BF16 or AMX runs bfloat16 matrix products several times faster than float32 (measured on a
2-core Xeon with AMX: 38 ms against 136 ms for 300 x 10^5 x 512); on a CPU with AVX2 and FMA only, torch
emulates them and the same product runs about 4x *slower* than float32. So a bf16 scan is chosen only where
the CPU has the instructions. torch's own probe (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) is not used:
it answers yes for AVX-512 without BF16, where oneDNN converts in software.

IDIA_CPU_BF16=0 or 1 overrides the detection (to compare both paths on one machine, or in tests).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the instructions that multiply bf16 natively
OVERRIDE_ENV = "IDIA_CPU_BF16"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), so that a bf16 scan pays."""
    override = os.environ.get(OVERRIDE_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "bf16" in cpu_flags()  # Armv8.6 BF16 (Linux lists it as "bf16")
    return any(f in cpu_flags() for f in BF16_FLAGS)
