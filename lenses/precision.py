"""Which dtype to run the big vocabulary matmuls in, chosen by measurement, not assumption.

Some CPUs run bfloat16 matmuls ~2-4x faster than float32 (AVX512-BF16/AMX), others several
times slower. ``auto`` times both once per machine and caches the answer in the lenses cache.
On CUDA, bfloat16 is used where supported.
"""

from __future__ import annotations

import json
import platform
import time

import torch

from .models import cache_dir

_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _time_matmul(dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(512, 576, device=device).to(dtype)
    b = torch.randn(576, 16384, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def compute_dtype(requested: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """Resolve ``auto``/a name/a dtype to the dtype for lens matmuls on ``device``."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested != "auto":
        if requested not in _CHOICES:
            raise ValueError(f"unknown compute dtype {requested!r}; use auto, float32, bfloat16 or float16")
        return _CHOICES[requested]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu":
        return torch.float32
    key = f"{platform.processor() or platform.machine()}|{torch.__version__}|{torch.get_num_threads()}"
    file = cache_dir() / "compute_dtype.json"
    try:
        cached = json.loads(file.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        t32 = _time_matmul(torch.float32, device)
        t16 = _time_matmul(torch.bfloat16, device)
        cached[key] = "bfloat16" if t16 < 0.8 * t32 else "float32"
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(cached, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
    return _CHOICES[cached[key]]
