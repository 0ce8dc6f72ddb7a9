#!/usr/bin/env python
"""Jacobian-lens fit speed: ours against TransformerLens 4.3's `JacobianLens.fit`, side by side.

    python benchmarks/jacobian_fit.py                         # SmolLM2, 2 Wikipedia prompts of 128 tokens
    python benchmarks/jacobian_fit.py --prompts 1 --seq-len 64   # quicker
    python benchmarks/jacobian_fit.py --bf16                      # also ours with the model in bfloat16

Same model (SmolLM2-135M-Instruct, float32), same token ids (TransformerLens's, BOS first), same
prompts, same dim_batch, same thread count, one process, alternating which runs first. Prints, per
implementation, prompts/s, the backward pass's achieved matmul FLOP/s as a share of this machine's
float32 matmul limit (median of single GEMMs of the backward's shapes), the speed ratio, and the
largest relative difference between the two J's (target: below 1e-4). With ``--bf16``, a third row: our
fit with the model in bfloat16 (sums still accumulated in float32) and its J's deviation from our float32
J; skipped where bfloat16 matmuls are emulated (AVX2-only CPUs), where it would run for hours.

The FLOP count is the backward's input-gradient matmuls of every linear layer of the blocks, over
the rows each implementation runs backward (theirs: all T positions; ours: T - 1 - 16, the first 16
being a cache and the last not run); attention's own products are not counted (small at 128 tokens).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lenses import ModelAdapter, load_model
from lenses.jobs.jlens_estimator import corpus_prompts, fit_prompts
from lenses.model.loading import resolve_model_path
from lenses.text.corpora import named_documents

ROOT = Path(__file__).resolve().parent.parent


def matmul_limit(shapes, repeats: int = 5) -> float:
    """Median float32 GEMM FLOP/s over ``shapes`` [(m, k, n)]."""
    rates = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            rates.append(2 * m * k * n / (time.perf_counter() - t))
    return float(torch.tensor(rates).median())


def backward_flops(model, rows: int, passes: int, dim_batch: int) -> float:
    """Input-gradient matmul FLOPs of one prompt's backward passes: 2 x rows x (in x out) per linear."""
    linear = sum(m.in_features * m.out_features for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in name)
    return 2.0 * linear * rows * dim_batch * passes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--bf16", action="store_true", help="also time our fit with the model in bfloat16")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.tools.analysis.jacobian_lens import JacobianLens as TLJacobianLens
    except ImportError:
        print("transformer-lens is not installed (pip install -e '.[tl]'): nothing to compare against.")
        return 0
    model, tok = load_model()
    adapter = ModelAdapter.from_model(model)
    theirs_model, _ = load_model()  # a second copy: the bridge wraps the modules of the model it is given
    bridge = TransformerBridge.boot_transformers(resolve_model_path(None), device="cpu", dtype=torch.float32,
                                                 tokenizer=tok, hf_model=theirs_model)
    bridge.eval()
    prompts = corpus_prompts(named_documents("wikipedia"), tok, a.prompts, a.seq_len)
    texts = [tok.decode(p[1:]) for p in prompts]  # TransformerLens re-tokenises and puts BOS first itself
    ids = [bridge.to_tokens(t)[0][: a.seq_len] for t in texts]
    d = adapter.d_model
    passes = -(-d // a.dim_batch)
    limit = matmul_limit([(a.dim_batch * a.seq_len, d, d), (a.dim_batch * a.seq_len, 1536, d),
                          (a.dim_batch * a.seq_len, d, 1536)])
    times = {"ours": [], "transformer-lens": []}
    result = {}
    for rnd in range(2):  # alternate the order; keep the faster of the two rounds each
        order = ["ours", "transformer-lens"] if rnd == 0 else ["transformer-lens", "ours"]
        for who in order:
            t = time.perf_counter()
            if who == "ours":
                result[who] = fit_prompts(adapter, ids, dim_batch=a.dim_batch)
            else:
                result[who] = TLJacobianLens.fit(bridge, texts, corpus="bench", dim_batch=a.dim_batch,
                                                 max_seq_len=a.seq_len, show_progress=False)
            times[who].append(time.perf_counter() - t)
    ours, theirs = result["ours"], result["transformer-lens"]
    rel = max(float((ours.matrices[k] - theirs.jacobians[k - 1]).norm() / theirs.jacobians[k - 1].norm())
              for k in ours.layers)
    print(f"SmolLM2-135M, {len(ids)} prompts of {ids[0].numel()} tokens, dim_batch {a.dim_batch}, {a.threads} "
          f"threads; float32 matmul limit {limit / 1e9:.0f} GFLOP/s")
    print(f"{'implementation':>18} {'s/prompt':>9} {'prompts/s':>10} {'backward GFLOP/s':>17} {'share of limit':>15}")
    for who, rows in (("ours", ids[0].numel() - 1 - 16), ("transformer-lens", ids[0].numel())):
        sec = min(times[who]) / len(ids)
        flops = backward_flops(model, rows, passes, a.dim_batch) / sec
        print(f"{who:>18} {sec:9.1f} {1 / sec:10.4f} {flops / 1e9:17.1f} {flops / limit:15.0%}")
    ratio = min(times["transformer-lens"]) / min(times["ours"])
    print(f"speed ratio (ours / transformer-lens, prompts/s): {ratio:.2f}x")
    print(f"largest relative difference of J (Frobenius, per layer): {rel:.2e}")
    if a.bf16:
        bf16_row(a, ids, ours, min(times["ours"]))
    return 0


def bf16_row(a, ids, ours32, seconds32: float) -> None:
    """Our fit with the model in bfloat16: speed against our float32 fit, and how far its J moves."""
    from run import bf16_is_native

    if not bf16_is_native():
        print("bfloat16: skipped (emulated on this CPU, many times slower than float32)")
        return
    model16, _ = load_model(dtype=torch.bfloat16)
    t = time.perf_counter()
    ours16 = fit_prompts(ModelAdapter.from_model(model16), ids, dim_batch=a.dim_batch)
    seconds16 = time.perf_counter() - t
    dev = max(float((ours16.matrices[k].float() - ours32.matrices[k]).norm() / ours32.matrices[k].norm())
              for k in ours32.layers)
    print(f"ours, model in bfloat16: {seconds16 / len(ids):.1f} s/prompt, {seconds32 / seconds16:.2f}x our float32 "
          f"speed; largest relative difference of J from float32 (Frobenius, per layer): {dev:.2e}")


if __name__ == "__main__":
    raise SystemExit(main())
