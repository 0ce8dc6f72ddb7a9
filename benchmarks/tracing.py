#!/usr/bin/env python
"""Tracing tokens/s, one text per forward pass against batched, side by side in one process.

    python benchmarks/tracing.py                              # SmolLM2 and Llama-3.2-1B's shapes
    python benchmarks/tracing.py --models smollm2 --tokens 512

Traces the same texts (held-out token blocks cut to 48, 96, 160 and 256 tokens in turn, as a view's texts
differ in length; every position read) with the logit and a tuned lens (`lenses.tracing.trace.trace`) under each
setting: `one-text` (batch 1, float32 vocabulary matmuls), `batched` (the views' default batch of 16 texts
of similar length, float32) and `batched, bf16` (and bfloat16 vocabulary matmuls re-scored in float32; only
where bfloat16 is native). Each setting runs once on a few texts first (compiled kernels), then is timed;
settings alternate over ``--rounds``. `share_of_limit` is the time every matmul would take at this machine's
limit (the median single-GEMM speed of the vocabulary shapes, `run.py`; the forward's at the model's dtype,
the vocabulary matmuls of every lens and of the teacher at the decode dtype) over the measured time.
Writes benchmarks/tracing.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe
from run import ROOT, bf16_is_native, forward_flops, get_model, matmul_samples, sync

from lenses import LogitLens, ModelAdapter, TunedLens
from lenses.tracing.trace import TraceItem, trace

LENGTHS = (48, 96, 160, 256)
SETTINGS = {"one-text": (1, torch.float32), "batched": (16, torch.float32), "batched, bf16": (16, torch.bfloat16)}


def texts(blocks: torch.Tensor, tokens: int) -> list[TraceItem]:
    """Held-out blocks cut to `LENGTHS` in turn, about ``tokens`` tokens in all, every position read."""
    items, n = [], 0
    for i in range(len(blocks) * len(LENGTHS)):
        ids = blocks[i % len(blocks)][: LENGTHS[i % len(LENGTHS)]].tolist()
        items.append(TraceItem(ids, list(range(len(ids)))))
        n += len(ids)
        if n >= tokens:
            return items
    return items


def seconds(adapter, lenses, items, batch_size: int, dtype) -> float:
    sync()
    t0 = time.perf_counter()
    trace(adapter, lenses, items, batch_size=batch_size, dtype=dtype)
    sync()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,llama-1b")
    p.add_argument("--tokens", type=int, default=1024, help="tokens traced per setting (default 1024)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "tracing.csv"))
    a = p.parse_args()
    native = bf16_is_native()
    settings = {k: v for k, v in SETTINGS.items() if native or v[1] == torch.float32}
    rows = []
    for name in a.models.split(","):
        model, _, held_out = get_model(name)
        adapter = ModelAdapter.from_model(model)
        lenses = {"logit": LogitLens(adapter), "tuned": TunedLens.for_model(adapter)}
        items = texts(held_out, a.tokens)
        n = sum(len(it.ids) for it in items)
        L, d, V = adapter.num_layers, adapter.d_model, adapter.vocab_size
        model_dtype = next(model.parameters()).dtype
        dtypes = {model_dtype} | {v[1] for v in settings.values()}
        limit = {k: float(np.median(matmul_samples(k, d, V))) for k in dtypes}
        forward = forward_flops(adapter, int(np.mean(LENGTHS)))
        vocab = 2 * len(lenses) * (L + 1) * d * V + 2 * d * V  # every lens at layers 0..L, and the teacher
        for b, dt in settings.values():  # compile and warm up
            trace(adapter, lenses, items[:4], batch_size=b, dtype=dt)
        took = {k: [] for k in settings}
        for r in range(a.rounds):
            for k in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
                took[k].append(seconds(adapter, lenses, items, *settings[k]))
                print(f"{name} {k}: {n / took[k][-1]:.1f} tokens/s", flush=True)
        for k, (b, dt) in settings.items():
            tps = n / float(np.mean(took[k]))
            ideal = forward / limit[model_dtype] + vocab / limit[dt]
            rows.append({"model": name, "setting": k, "batch_size": b, "decode_dtype": str(dt).removeprefix("torch."),
                         "tokens": n, "texts": len(items), "tokens_per_s": tps,
                         "vs_one_text": tps * float(np.mean(took["one-text"])) / n, "share_of_limit": tps * ideal})
        del model
    table = pd.DataFrame(rows)
    table["machine"], table["date"] = describe(), time.strftime("%Y-%m-%d")
    table.to_csv(a.out, index=False)
    print(table.drop(columns=["machine", "date"]).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
