#!/usr/bin/env python
"""How close the main command's tracing runs to this machine's matmul limit, view by view.

    python benchmarks/views_limit.py                  # the main command: four views, full samples
    python benchmarks/views_limit.py --scale 0.3 --out /tmp/limit.csv

Runs `analyze.py --view all` (the default model, the three shipped lenses) in this process with the
tracing's two parts timed and their matmul work counted: the forward passes (`lenses.tracing.batching.hidden_of_batch`
and the shared prefix: tokens computed, pads included, a prefix run once; FLOPs as `run.forward_flops`, with
each batch's own context length) and the vocabulary decoding (`lenses.tracing.trace.decode_chunk`: per chunk of C
positions, C rows for every layer below L that each lens reads, in the decode dtype, and C float32 rows for the
teacher; 2 d V FLOPs a row). Then, in the same process, it measures the matmul limit at the same shapes: the
model's own linear layers on 512 tokens in the model's dtype (the forward), and the unembedding on 256 rows in
each decode dtype (best of 5 each). ``limit_s`` is the counted work at those speeds; ``share_of_limit`` =
limit_s / the measured forward + decode seconds. Writes a tidy CSV (one row per view, and "all").
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe
from run import ROOT, forward_flops
from views import SAMPLE

import lenses.commands.analyze as command
import lenses.tracing.trace as T


def name(part) -> str:
    """"forward", or the decode dtype's name ("decode_bfloat16")."""
    return part if isinstance(part, str) else "decode_" + str(part).removeprefix("torch.")


class Counted:
    """Seconds and FLOPs (per dtype) of the forward passes and the decoding, per view."""

    def __init__(self):
        self.seconds = defaultdict(float)  # (view, part) -> s
        self.flops = defaultdict(float)  # (view, "forward" or a decode dtype) -> FLOPs
        self.view = "(outside the views)"

    def wrap(self) -> None:
        hidden, decode, prefix = T.hidden_of_batch, T.decode_chunk, T.shared_prefix

        depth = [0]  # `shared_prefix` runs `hidden_of_batch` too: only the outer call's seconds count

        def timed(part, fn, count):
            def run(*args, **kwargs):
                t0 = time.perf_counter()
                depth[0] += 1
                try:
                    out = fn(*args, **kwargs)
                finally:
                    depth[0] -= 1
                if not depth[0]:
                    self.seconds[self.view, part] += time.perf_counter() - t0
                count(args, out)
                return out
            return run

        def forward(args, out):
            adapter, batch, pre = args[0], args[1], args[2] if len(args) > 2 else None
            skip = pre.length if pre else 0
            n = max(len(ids) for _, ids, _ in batch) - skip  # each text's tokens after the prefix, pads included
            self.flops[self.view, "forward"] += len(batch) * n * forward_flops(adapter, 2 * skip + n)

        def prefix_run(args, out):
            if out is not None:  # the prefix, and the first text whole (the check that the cache gives its states)
                adapter, n, first = args[0], out.length, len(args[1][0][1])
                work = n * forward_flops(adapter, n) + first * forward_flops(adapter, first)
                self.flops[self.view, "forward"] += work

        def decoded(args, out):
            adapter, lenses, h, dtype = args[0], args[1], args[2], args[7]
            L, C, row = adapter.num_layers, h.shape[1], 2 * adapter.d_model * adapter.vocab_size
            read = sum(lens.has_layer(layer) for lens in lenses.values() for layer in range(L))
            self.flops[self.view, dtype] += C * read * row
            self.flops[self.view, torch.float32] += C * row  # the teacher

        T.hidden_of_batch = timed("forward", hidden, forward)
        T.shared_prefix = timed("forward", prefix, prefix_run)
        T.decode_chunk = timed("decode", decode, decoded)
        views = command.run_views

        def per_view(ctx, names, report):
            for name in names:
                self.view = name
                views(ctx, [name], report)
            self.view = "(outside the views)"
            self.adapter = ctx.adapter

        command.run_views = per_view


def best_speed(f, flops: float, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` calls of ``f`` (after one warm-up call)."""
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def limit_speeds(adapter, decode_dtypes) -> dict:
    """FLOP/s per part: "forward" (every linear layer of the blocks on 512 tokens, their FLOPs over their summed
    best times) and each decode dtype (the unembedding, [256, d] @ [d, V])."""
    from lenses import engine

    linears = [m for m in adapter.layers.modules() if isinstance(m, torch.nn.Linear)]
    flops = seconds = 0.0
    with torch.no_grad():
        for m in linears:
            x = torch.randn(512, m.in_features, dtype=m.weight.dtype, device=m.weight.device)
            f = 2 * 512 * m.in_features * m.out_features
            flops, seconds = flops + f, seconds + f / best_speed(lambda m=m, x=x: m(x), f)
        speeds = {"forward": flops / seconds}
        u, row = torch.randn(256, adapter.d_model, device=adapter.device), 2 * adapter.d_model * adapter.vocab_size
        for dt in decode_dtypes:
            speeds[dt] = best_speed(lambda dt=dt: engine.unembed(adapter, u, dt), 256 * row)
    return speeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="share of the main command's samples (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "views-limit.csv"))
    a = p.parse_args()
    counted = Counted()
    counted.wrap()
    argv = ["--view", "all", "--out", str(Path(__import__("tempfile").mkdtemp()) / "out"), "--no-progress"]
    if a.scale != 1:
        for flag, full in SAMPLE.values():
            argv += [flag, str(max(2, int(full * a.scale)))]
    command.main(argv)
    speed = limit_speeds(counted.adapter, {dt for _, dt in counted.flops if dt != "forward"})
    rows = []
    views = sorted({v for v, _ in counted.seconds})
    for view in views + ["all"]:
        pick = (lambda v: True) if view == "all" else (lambda v, view=view: v == view)
        fwd = sum(s for (v, part), s in counted.seconds.items() if pick(v) and part == "forward")
        dec = sum(s for (v, part), s in counted.seconds.items() if pick(v) and part == "decode")
        limit = sum(f / speed[dt] for (v, dt), f in counted.flops.items() if pick(v))
        rows.append({"view": view, "forward_s": fwd, "decode_s": dec, "limit_s": limit,
                     "share_of_limit": limit / (fwd + dec) if fwd + dec else float("nan"),
                     **{f"gflops_{name(k)}": v / 1e9 for k, v in speed.items()}})
    table = pd.DataFrame(rows)
    table["machine"], table["date"], table["scale"] = describe(), time.strftime("%Y-%m-%d"), a.scale
    table.to_csv(a.out, index=False)
    print(table.drop(columns=["machine", "date"]).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
