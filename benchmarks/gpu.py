#!/usr/bin/env python
"""One command for a lent accelerator: our training and tracing against tuned-lens's step and the device's
matmul limit, and the peak memory against the plan, on a random-weight model of a real config.

    python benchmarks/gpu.py                                   # Llama-3.1-8B's shapes, bfloat16, on cuda
    python benchmarks/gpu.py --config tests/data/configs/tiny-llama.json --device cpu --tokens 256   # a dry run

Writes benchmarks/gpu.csv (name the device in the docs with the figures). Rows: the bfloat16 matmul limit
of the lens's shapes measured on the device; training tokens/s (ours, tuned-lens 0.2's own step) with
their share of that limit; tracing tokens/s; the device's peak memory in training against
`lenses.jobs.plan`'s. Values of the weights do not matter for any of these.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as bench  # noqa: E402  (benchmarks/ on the path first)

from lenses import ModelAdapter  # noqa: E402
from lenses.jobs.plan import PlanOptions, components, model_shapes  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "tests" / "data" / "configs" / "llama-3.1-8b.json"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per training step and traced")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu.csv"))
    a = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    config = AutoConfig.from_pretrained(a.config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)
    adapter = ModelAdapter.from_model(model)
    L, d, V = adapter.num_layers, adapter.d_model, adapter.vocab_size
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, V, (64, bench.SEQ), generator=g).to(device)
    limit = float(np.median(bench.matmul_samples(torch.bfloat16, d, V, device=a.device)))
    rows = [{"measure": "matmul", "method": "bfloat16 limit, median of the lens's two GEMM shapes",
             "gflop_s": limit / 1e9}]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for r in bench.bench_training(model, adapter, blocks[:48], blocks[48:56], a.tokens, a.steps):
        r["share_of_limit"] = r["tokens_per_s"] * 4 * L * d * V / limit
        rows.append(r)
    if device.type == "cuda":
        batch = max(1, a.tokens // bench.SEQ)
        plan = components(model_shapes(a.config), PlanOptions(job="train", model_dtype="bfloat16",
                                                              compute_dtype="bfloat16", batch_size=batch,
                                                              seq_len=bench.SEQ, device_type="cuda"), 1)
        rows.append({"measure": "memory", "method": "peak allocated in training vs the plan",
                     "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                     "planned_mib": sum(plan.values()) / 2**20})
    for r in bench.bench_tracing(model, adapter, blocks[48:], a.tokens):
        if r["measure"] == "trace":
            r["share_of_limit"] = r["tokens_per_s"] * 2 * 2 * (L + 1) * d * V / limit
        rows.append(r)
    table = pd.DataFrame(rows).assign(device=name, config=Path(a.config).name)
    table.to_csv(a.out, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
