"""Early-exit view: stop the model at layer l and emit the lens's prediction (Gupta et al. 2025,
arXiv 2510.18871v2, causal checks). The model is causal in depth, so the output of a model cut
after block l-1 and read through a lens is exactly the lens applied to ``hidden[l]`` of the full
forward pass (tested against a physically truncated copy of the model); one forward per text
therefore gives every exit layer.

On held-out blocks of the corpus, per lens and exit layer l:
- agreement: share of positions whose exit top-1 equals the full model's top-1;
- accuracy and cross-entropy against the true next token;
- KL(full model || exit distribution).

Adaptive exit: at each position, exit at the first layer whose top-1 probability reaches a
threshold (else at the last layer); swept over thresholds, it gives the mean exit layer against
agreement and accuracy, the curve of what a confidence-based early exit would cost.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult, prefix_note, table_plot, text_blocks
from lenses.tracing.depth import trajectories
from lenses.tracing.intervals import describe, mean_interval
from lenses.tracing.trace import TraceItem, trace

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def early_exit_view(adapter, tokenizer, lenses: dict, texts: list[str], num_positions: int = 1000,
                    seq_len: int = 128, thresholds=THRESHOLDS, seed: int = 0, progress: bool = False,
                    batch_size: int = 1, dtype: torch.dtype = torch.float32,
                    source: str = "the texts given") -> ViewResult:
    chosen, held, available, first = text_blocks(texts, tokenizer, seq_len, num_positions, seed, "early-exit")
    per_block = seq_len - 1 - first
    items, left = [], num_positions
    for b in chosen:
        ids = held[b].tolist()
        k = min(per_block, left)
        left -= k
        items.append(TraceItem(ids, list(range(first, first + k)), {"next": ids[first + 1: first + k + 1]}))
    df = trace(adapter, lenses, items, progress=progress, batch_size=batch_size, dtype=dtype)
    layers, adaptive = _layer_table(df, seed), _adaptive_table(df, thresholds)
    usage = Usage("positions", num_positions, available, num_positions - left, source, prefix_note(tokenizer))
    return ViewResult("early-exit", {"layers": layers, "adaptive": adaptive}, _summary(layers, adaptive),
                      usage=[usage])


def _final_top1(df: pd.DataFrame) -> pd.Series:
    last = df[df.layer == df.layer.max()]
    return last.drop_duplicates(["item", "position"]).set_index(["item", "position"]).top1_id


def _layer_table(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """lens, layer, agreement and accuracy (each with its 95% interval, resampled by text), cross_entropy,
    kl, n."""
    final = _final_top1(df)
    keyed = df.set_index(["item", "position"])
    absent = df.top1_id.to_numpy() < 0  # a layer the lens does not read: NaN, not "wrong"
    agree = (keyed.top1_id.to_numpy() == final.reindex(keyed.index).to_numpy()).astype(float)
    df = df.assign(agree=np.where(absent, np.nan, agree),
                   correct=np.where(absent, np.nan, (df.rank_next == 1).astype(float)),
                   nll=-np.log(np.clip(df.prob_next.to_numpy(), 1e-45, None)))
    rows = []
    for (lens, layer), g in df.groupby(["lens", "layer"], sort=True):
        agreement = mean_interval(g.agree, g["item"], seed=seed)
        accuracy = mean_interval(g.correct, g["item"], seed=seed)
        rows.append({"lens": lens, "layer": layer, "agreement": agreement[0], "agreement_ci_low": agreement[1],
                     "agreement_ci_high": agreement[2], "accuracy": accuracy[0], "accuracy_ci_low": accuracy[1],
                     "accuracy_ci_high": accuracy[2], "cross_entropy": g.nll.mean(), "kl": g.kl.mean(), "n": len(g)})
    return pd.DataFrame(rows)


def _adaptive_table(df: pd.DataFrame, thresholds) -> pd.DataFrame:
    rows = []
    for lens, g in df.groupby("lens", sort=False):
        keys, conf = trajectories(g, "top1_prob")
        _, top1 = trajectories(g, "top1_id")
        _, rank = trajectories(g, "rank_next")
        L = conf.shape[1] - 1
        final = top1[:, -1]
        for t in thresholds:
            hit = conf >= t
            hit[:, -1] = True  # the last layer always exits
            exit_at = hit.argmax(1)
            idx = np.arange(len(exit_at))
            rows.append({"lens": lens, "threshold": t, "mean_exit_layer": exit_at.mean(),
                         "share_early": float((exit_at < L).mean()),
                         "agreement": float((top1[idx, exit_at] == final).mean()),
                         "accuracy": float((rank[idx, exit_at] == 1).mean()),
                         "layers_saved": float(1 - exit_at.mean() / L), "n": len(exit_at)})
    return pd.DataFrame(rows)


def _summary(layers: pd.DataFrame, adaptive: pd.DataFrame) -> list[str]:
    lines = []
    L = int(layers.layer.max())
    full_acc = layers[layers.layer == L].accuracy.iloc[0]
    for lens, g in layers.groupby("lens", sort=False):
        g = g.set_index("layer")
        half = g.loc[L // 2]
        first90 = g.index[g.agreement >= 0.9]
        agree = describe(half.agreement, half.agreement_ci_low, half.agreement_ci_high, percent=True)
        acc = describe(half.accuracy, half.accuracy_ci_low, half.accuracy_ci_high, percent=True)
        lines.append(f"{lens:>6} lens: exit at layer {L // 2} agrees with the full model on {agree} "
                     f"(accuracy {acc} vs {full_acc:.0%} at {L}); agreement reaches 90% at layer "
                     f"{int(first90[0]) if len(first90) else 'never'}")
        a = adaptive[(adaptive.lens == lens) & (adaptive.threshold == 0.9)]
        if len(a):
            a = a.iloc[0]
            lines.append(f"{'':>6}  adaptive exit at top-1 probability >= 0.9: mean exit layer "
                         f"{a.mean_exit_layer:.1f} of {L}, agreement {a.agreement:.0%}, accuracy {a.accuracy:.0%}")
    return lines


def run(ctx) -> ViewResult:
    texts, source = ctx.view_texts
    return early_exit_view(*ctx.parts, texts, ctx.cfg.num_positions, **ctx.sampling, **ctx.decoding, source=source)


plot = table_plot("plot_early_exit", "layers", "adaptive")
