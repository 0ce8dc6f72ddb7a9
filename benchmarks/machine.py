"""The machine a benchmark ran on, in one line: CPU model, its bfloat16/AVX features, cores and memory."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        cpu, flags = platform.processor() or platform.machine(), []
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags][:2]
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = ""
    return f"{cpu} ({', '.join(isa) or 'no AVX2'}), {os.cpu_count()} cores{memory}"
