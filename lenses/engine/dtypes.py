"""The engine's policies: which dtype the vocabulary matmuls run in (measured, not assumed) and how many
rows of logits to hold at once (a byte budget)."""

from __future__ import annotations

import json
import platform
import time

import torch

from lenses.base.errors import LensesError
from lenses.base.io import cache_dir
from lenses.engine.protocol import Readout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_chunk_rows(adapter: Readout, dtype: torch.dtype) -> int:
    """Rows per vocabulary chunk, from a byte budget for the ``[rows x V]`` logits.

    On a CPU with 16-bit matmuls, ~24 MB keeps the logits in the last-level cache between the
    matmul and the element-wise pass (240 rows for SmolLM2: 25% faster than 2,048 rows, measured);
    float32 and GPUs prefer bigger matmuls (2,048 rows of float32 for SmolLM2, ~400 MB).
    """
    small = adapter.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    budget = 24 * 2**20 if small else 400 * 2**20
    return max(1, budget // (adapter.vocab_size * torch.finfo(dtype).bits // 8))


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
    """Resolve ``auto``/a name/a dtype to the dtype of the vocabulary matmuls on ``device``.

    Some CPUs run bfloat16 matmuls ~2-4x faster than float32 (AVX512-BF16/AMX), others several
    times slower (AVX2: emulated). ``auto`` times both once per machine and caches the answer in
    the lenses cache; on CUDA it is bfloat16 where supported.
    """
    if isinstance(requested, torch.dtype):
        return requested
    if requested != "auto":
        if requested not in DTYPES:
            raise LensesError(f"unknown compute dtype {requested!r}; use auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu":
        return torch.float32
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "AVX512":
        return torch.float32  # no AVX-512 (an AVX2-only CPU): bfloat16 matmuls are emulated; timing one costs ~30 s
    key = f"{platform.processor() or platform.machine()}|{torch.__version__}|{torch.get_num_threads()}"
    file = cache_dir() / "compute_dtype.json"
    try:
        cached = json.loads(file.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict) or cached.get(key) not in DTYPES:
        cached = cached if isinstance(cached, dict) else {}
        t32 = _time_matmul(torch.float32, device)
        t16 = _time_matmul(torch.bfloat16, device)
        cached[key] = "bfloat16" if t16 < 0.8 * t32 else "float32"
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(cached, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
    return DTYPES[cached[key]]
