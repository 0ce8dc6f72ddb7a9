#!/usr/bin/env python
"""Training throughput of our fused KL step vs a straightforward per-layer autograd step, side by side.

    python benchmarks/train_throughput.py [--tokens 1024] [--repeats 2]

The straightforward step is what the tuned-lens package does (per layer: translate, decode
through the full vocabulary, log-softmax, KL, autograd backward). Both run on the same model,
tokens and thread count in one process; we print tokens/s, their ratio, and the fraction of the
machine's measured matmul FLOP/s each reaches (~4*L*d*V FLOP per token for the lens part).
Numbers vary between machines and runs: read the ratios.
"""

from __future__ import annotations

import argparse
import time

import torch

from lenses import ModelAdapter, TunedLens, load_model
from lenses.data import make_blocks, read_texts
from lenses.precision import compute_dtype
from lenses.train import lens_kl_backward


def naive_step(lens: TunedLens, hidden: torch.Tensor, autocast: bool) -> None:
    adapter, L = lens.adapter, lens.num_layers
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp = torch.log_softmax(adapter.decode(hidden[L]).float(), -1)
        for layer in range(L):
            logq = torch.log_softmax(lens(hidden[layer], layer).float(), -1)
            kl = (logp.exp() * (logp - logq)).sum(-1).mean()
            kl.backward()


def matmul_flops(dtype: torch.dtype, d: int, V: int, rows: int = 1024) -> float:
    a, w = torch.randn(rows, d).to(dtype), torch.randn(V, d).to(dtype)
    a @ w.T
    t0 = time.perf_counter()
    for _ in range(3):
        a @ w.T
    return 3 * 2 * rows * d * V / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    model, tok = load_model()
    adapter = ModelAdapter.from_model(model)
    blocks, _ = make_blocks(read_texts(None), tok, seq_len=256)
    batch = blocks[: max(1, a.tokens // 256)]
    hidden = adapter.hidden_states(batch).flatten(1, 2)
    L, d, V = adapter.num_layers, adapter.d_model, adapter.vocab_size
    flop_per_token = 4 * L * d * V
    auto = compute_dtype("auto")
    lens = TunedLens.for_model(adapter)
    runs = {
        f"ours ({str(auto).replace('torch.', '')})": lambda: lens_kl_backward(lens, hidden, None, auto),
        "ours (float32)": lambda: lens_kl_backward(lens, hidden, None, torch.float32),
        "per-layer autograd (float32)": lambda: naive_step(lens, hidden, False),
        "per-layer autograd (bf16 autocast)": lambda: naive_step(lens, hidden, True),
    }
    limits = {torch.float32: matmul_flops(torch.float32, d, V), torch.bfloat16: matmul_flops(torch.bfloat16, d, V)}
    print(f"matmul limit: float32 {limits[torch.float32] / 1e9:.0f} GFLOP/s, bfloat16 {limits[torch.bfloat16] / 1e9:.0f} GFLOP/s")
    print(f"{hidden.shape[1]} tokens per step, {torch.get_num_threads()} threads")
    results = {}
    for name, fn in runs.items():
        fn()  # warm-up (and torch.compile)
        lens.zero_grad()
        t0 = time.perf_counter()
        for _ in range(a.repeats):
            fn()
            lens.zero_grad()
        results[name] = hidden.shape[1] * a.repeats / (time.perf_counter() - t0)
    base = results["per-layer autograd (float32)"]
    for name, tps in results.items():
        dt = torch.bfloat16 if ("bf16" in name or "bfloat16" in name) else torch.float32
        frac = tps * flop_per_token / limits[dt]
        print(f"{name:38s} {tps:8.1f} tok/s  x{tps / base:5.2f} vs per-layer fp32  {frac:5.0%} of {str(dt)[6:]} matmul limit")


if __name__ == "__main__":
    main()
