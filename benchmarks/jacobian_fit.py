#!/usr/bin/env python
"""Jacobian-lens fit speed: ours against TransformerLens 4.3's `JacobianLens.fit`, side by side.

    python benchmarks/jacobian_fit.py                         # SmolLM2, 2 Wikipedia prompts of 128 tokens
    python benchmarks/jacobian_fit.py --prompts 1 --seq-len 64   # quicker
    python benchmarks/jacobian_fit.py --half                      # also ours with bfloat16 backward matmuls

Same model (SmolLM2-135M-Instruct, float32), same token ids (TransformerLens's, BOS first), same
prompts, same dim_batch, same thread count, one process, alternating which runs first. Prints, per
implementation, prompts/s, the backward pass's achieved matmul FLOP/s as a share of this machine's
float32 matmul limit (median of single GEMMs of the backward's shapes), the speed ratio, and the
largest relative difference between the two J's (target: below 1e-4). With ``--half``, a third row: our fit
with the backward's matmuls in bfloat16 (`lenses.jobs.jlens_half`: weights rounded stochastically, sums in
float32), its speed against both, and the statistical rule: per layer, its J's deviation from our float32 J
over the float32 J's own sampling error (the ideal bootstrap over the prompts: `Spread`; the rule asks for
below 0.1), and each lens's held-out KL per layer with its 95% interval (resampling blocks); skipped where
bfloat16 matmuls are emulated (AVX2-only CPUs).

The FLOP count is the backward's input-gradient matmuls of every linear layer of the blocks, over
the rows each implementation runs backward (theirs: all T positions; ours: T - 1 - 16, the first 16
being a cache and the last not run); attention's own products are not counted (small at 128 tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from lenses import ModelAdapter, load_model
from lenses.jobs import jlens_written
from lenses.jobs.jlens_estimator import corpus_prompts, fit_prompts
from lenses.jobs.jlens_half import RULE, Spread, deviation_rule
from lenses.model.loading import resolve_model_path
from lenses.text.corpora import named_documents
from lenses.text.data import make_blocks
from lenses.tracing.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent
HALF = "ours, bfloat16 backward"


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
    p.add_argument("--half", action="store_true", help="also time our fit with bfloat16 backward matmuls")
    p.add_argument("--autograd", action="store_true", help="also time our fits with autograd's backward (the route "
                                                            "of blocks other than Llama's)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, alternating which runs first (the faster kept)")
    p.add_argument("--out", default=None, help="also write the rows as CSV (docs/jacobian.md's table reads "
                                               "benchmarks/jacobian-fit.csv)")
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
    half = a.half and bf16_native()
    spread = Spread()
    runs = {"ours": lambda rnd: fit_prompts(adapter, ids, dim_batch=a.dim_batch, spread=spread if rnd == 0 else None),
            "transformer-lens": lambda rnd: TLJacobianLens.fit(bridge, texts, corpus="bench", dim_batch=a.dim_batch,
                                                               max_seq_len=a.seq_len, show_progress=False)}
    if half:
        runs[HALF] = lambda rnd: fit_prompts(adapter, ids, dim_batch=a.dim_batch, backward_dtype=torch.bfloat16)
    if a.autograd:  # the same fits with autograd's backward: the written-out backward's gain, side by side
        runs["ours, autograd backward"] = lambda rnd: fit_prompts(adapter, ids, dim_batch=a.dim_batch, written=False)
        if half:
            runs["ours, autograd, bfloat16 backward"] = lambda rnd: fit_prompts(
                adapter, ids, dim_batch=a.dim_batch, backward_dtype=torch.bfloat16, written=False)
    times, result = {who: [] for who in runs}, {}
    for rnd in range(a.rounds):  # alternate the order; keep the faster round of each
        for who in (list(runs) if rnd % 2 == 0 else list(runs)[::-1]):
            t = time.perf_counter()
            result[who] = runs[who](rnd)
            times[who].append(time.perf_counter() - t)
    ours, theirs = result["ours"], result["transformer-lens"]
    rel = max(float((ours.matrices[k] - theirs.jacobians[k - 1]).norm() / theirs.jacobians[k - 1].norm())
              for k in ours.layers)
    print(f"SmolLM2-135M, {len(ids)} prompts of {ids[0].numel()} tokens, dim_batch {a.dim_batch}, {a.threads} "
          f"threads; float32 matmul limit {limit / 1e9:.0f} GFLOP/s")
    route = jlens_written.describe(adapter)
    print(f"our backward passes: {route}")
    print(f"{'implementation':>18} {'s/prompt':>9} {'prompts/s':>10} {'backward GFLOP/s':>17} {'share of limit':>15}")
    table = []
    for who in times:
        rows = ids[0].numel() if who == "transformer-lens" else ids[0].numel() - 1 - 16
        sec = min(times[who]) / len(ids)
        table.append({"implementation": who, "s_per_prompt": sec, "vs_transformer_lens": min(
            times["transformer-lens"]) / min(times[who]), "share_of_fp32_limit": backward_flops(
            model, rows, passes, a.dim_batch) / sec / limit})
        flops = backward_flops(model, rows, passes, a.dim_batch) / sec
        print(f"{who:>18} {sec:9.1f} {1 / sec:10.4f} {flops / 1e9:17.1f} {flops / limit:15.0%}")
    for who in [w for w in times if w != "transformer-lens"]:
        print(f"speed ratio ({who} / transformer-lens, prompts/s): "
              f"{min(times['transformer-lens']) / min(times[who]):.2f}x")
    print(f"largest relative difference of J (Frobenius, per layer), ours vs transformer-lens: {rel:.2e}")
    if a.half and not half:
        print("bfloat16 backward: skipped (emulated on this CPU, many times slower than float32)")
    elif half:
        next(row for row in table if row["implementation"] == HALF).update(half_rule(
            adapter, tok, ours, result[HALF], spread, min(times["ours"]) / min(times[HALF])))
    if a.out:
        from machine import describe

        frame = pd.DataFrame(table).assign(prompts=len(ids), tokens=ids[0].numel(), j_vs_tl_rel=rel, our_backward=route,
                                           machine=describe(), date=time.strftime("%Y-%m-%d"),
                                           command="python benchmarks/jacobian_fit.py " + " ".join(argv or
                                                                                                  sys.argv[1:]))
        frame.to_csv(a.out, index=False)
        print(f"wrote {a.out}")
    return 0


def bf16_native() -> bool:
    from run import bf16_is_native

    return bf16_is_native()


def half_rule(adapter, tok, ours32, ours16, spread: Spread, speedup: float) -> dict:
    """The bfloat16-backward fit against the float32 one: the statistical rule per layer, and the held-out KL
    per layer of both lenses with their intervals."""
    if spread.n < 2:
        print(f"bfloat16 backward: {speedup:.2f}x our float32 fit; the statistical rule needs 2 prompts or more "
              "(a sampling error over prompts)")
        return {}
    J16 = torch.stack([ours16.matrices[k] for k in ours32.layers])
    dev, se, passes = deviation_rule(J16, spread)
    ratio = dev / se
    print(f"bfloat16 backward: {speedup:.2f}x our float32 fit; its J's deviation from the float32 J over the float32 "
          f"J's sampling error ({spread.n} prompts, ideal bootstrap), per layer: max {float(ratio.max()):.4f}, median "
          f"{float(ratio.median()):.4f} (rule: below {RULE}: {'passes' if passes else 'FAILS'}); relative deviation "
          f"max {float((dev / spread.mean().norm(dim=(-2, -1))).max()):.2e}")
    _, held = make_blocks(named_documents("wikipedia"), tok, 256, max_eval_blocks=4)
    table = evaluate(adapter, {"float32": ours32, "bfloat16 backward": ours16}, held, tok).table()
    wide = table.pivot(index="layer", columns="lens", values=["kl_nats", "kl_low", "kl_high"])
    inside = ((wide["kl_nats"]["bfloat16 backward"] >= wide["kl_low"]["float32"])
              & (wide["kl_nats"]["bfloat16 backward"] <= wide["kl_high"]["float32"])).dropna()
    worst = float((wide["kl_nats"]["bfloat16 backward"] - wide["kl_nats"]["float32"]).abs().max())
    print(f"held-out KL per layer ({held.numel():,} tokens, 4 blocks): the bfloat16-backward lens's within the "
          f"float32 lens's 95% interval at {int(inside.sum())} of {len(inside)} layers; largest difference "
          f"{worst:.2e} nats")
    return {"dev_over_se_max": float(ratio.max()), "dev_over_se_median": float(ratio.median()),
            "rule_passes": passes, "kl_layers_inside": int(inside.sum()), "kl_layers": len(inside),
            "kl_largest_difference": worst}


if __name__ == "__main__":
    raise SystemExit(main())
