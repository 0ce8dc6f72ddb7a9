"""Calibration view: can a lens's probabilities be read at face value, layer by layer?

For every lens and layer, on held-out positions, the lens's top-1 probability (its confidence) is set
against whether that top-1 is right, in two senses: (a) it agrees with the model's own final top-1
(``reference = final``: the lens as a forecast of the model), (b) it is the true next token
(``reference = next``). Positions are binned by confidence (``bins`` equal-width bins of [0, 1]); the
expected calibration error is

    ECE = sum over bins b of (n_b / N) * |accuracy_b - confidence_b|

(Guo et al. 2017, arXiv 1706.04599), 0 for a perfectly calibrated lens, with a 95% interval resampled by
text (`lenses.tracing.intervals.sums_interval`). The reliability curve is accuracy against confidence per bin.
At layer L every lens reads the model's output, so its agreement with the final top-1 is 100% and its ECE
against ``final`` is 1 minus its mean confidence.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult, prefix_note, table_plot, text_blocks
from lenses.tracing.depth import trajectories
from lenses.tracing.intervals import describe, sums_interval
from lenses.tracing.trace import TraceItem, trace

REFERENCES = {"final": "the model's final top-1", "next": "the true next token"}


def bin_columns(confidence, correct, bins: int = 10) -> np.ndarray:
    """Per position, the additive columns of the ECE: [count, confidence, correct] in its bin, others 0
    ([positions, 3 * bins]; bin b spans [b/bins, (b+1)/bins), the last includes 1)."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    b = np.clip((confidence * bins).astype(int), 0, bins - 1)
    out = np.zeros((len(confidence), 3 * bins))
    rows = np.arange(len(confidence))
    out[rows, b], out[rows, bins + b], out[rows, 2 * bins + b] = 1.0, confidence, correct
    return out


def ece_of_sums(totals: np.ndarray, bins: int = 10) -> np.ndarray:
    """The ECE from summed `bin_columns` ([..., 3 * bins] -> [...])."""
    n, conf, acc = totals[..., :bins], totals[..., bins : 2 * bins], totals[..., 2 * bins :]
    return np.abs(acc - conf).sum(-1) / n.sum(-1)


def expected_calibration_error(confidence, correct, bins: int = 10) -> float:
    """ECE of ``confidence`` in [0, 1] against 0/1 ``correct`` (see the module docstring)."""
    return float(ece_of_sums(bin_columns(confidence, correct, bins).sum(0), bins))


def _tables(df: pd.DataFrame, bins: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    layers, curve = [], []
    for (lens, layer), g in df.groupby(["lens", "layer"], sort=True):
        if (g.top1_id < 0).all():  # a layer this lens does not read
            continue
        for ref in REFERENCES:
            correct = g[f"correct_{ref}"].to_numpy(dtype=float)
            conf = g.top1_prob.to_numpy(dtype=float)
            cols = bin_columns(conf, correct, bins)
            ece, lo, hi = sums_interval(cols, g["item"].to_numpy(), lambda t: ece_of_sums(t, bins), seed=seed)
            layers.append({"lens": lens, "layer": layer, "reference": ref, "ece": ece, "ci_low": lo, "ci_high": hi,
                           "confidence": conf.mean(), "accuracy": correct.mean(), "n": len(g)})
            sums = cols.sum(0)
            for b in range(bins):
                n = sums[b]
                curve.append({"lens": lens, "layer": layer, "reference": ref, "bin_low": b / bins,
                              "bin_high": (b + 1) / bins, "confidence": sums[bins + b] / n if n else np.nan,
                              "accuracy": sums[2 * bins + b] / n if n else np.nan, "n": int(n)})
    return pd.DataFrame(layers), pd.DataFrame(curve)


def calibration_view(adapter, tokenizer, lenses: dict, texts: list[str], num_positions: int = 1000,
                     seq_len: int = 128, bins: int = 10, seed: int = 0, progress: bool = False, batch_size: int = 1,
                     dtype: torch.dtype = torch.float32, source: str = "the texts given") -> ViewResult:
    """Run the calibration view on ``num_positions`` positions of blocks of ``seq_len`` tokens of ``texts``."""
    chosen, blocks, available, first = text_blocks(texts, tokenizer, seq_len, num_positions, seed, "calibration")
    items, left = [], num_positions
    for b in chosen:
        ids = blocks[b].tolist()
        positions = list(range(first, min(len(ids) - 1, first + left)))
        items.append(TraceItem(ids, positions, {"next": [ids[p + 1] for p in positions]}))
        left -= len(positions)
    df = trace(adapter, lenses, items, progress=progress, batch_size=batch_size, dtype=dtype)
    _, top1 = trajectories(df, "top1_id")
    df["correct_final"] = (top1 == top1[:, -1:]).reshape(-1)
    df["correct_next"] = df.rank_next.to_numpy() == 1
    layers, curve = _tables(df, bins, seed)
    usage = Usage("positions", num_positions, available, num_positions - left, source, prefix_note(tokenizer))
    return ViewResult("calibration", {"layers": layers, "bins": curve}, _summary(layers, adapter.num_layers),
                      usage=[usage])


def _summary(layers: pd.DataFrame, L: int) -> list[str]:
    lines = []
    for lens, g in layers.groupby("lens", sort=False):
        parts = []
        for ref, what in REFERENCES.items():
            r = g[(g.reference == ref) & (g.layer < L)].set_index("layer")
            if r.empty:
                continue
            mid, best = L // 2 if L // 2 in r.index else r.index[0], r.ece.idxmin()
            parts.append(f"vs {what}: ECE {describe(r.ece.loc[mid], r.ci_low.loc[mid], r.ci_high.loc[mid], 2)} at "
                         f"layer {mid}, lowest {r.ece.loc[best]:.2f} at layer {best}")
        final = g[(g.reference == "next") & (g.layer == L)]
        if len(final):
            parts.append(f"the model's own output (layer {L}) vs the next token: ECE {final.ece.iloc[0]:.2f}")
        lines.append(f"{lens:>6} lens: " + "; ".join(parts))
    return lines


def run(ctx) -> ViewResult:
    texts, source = ctx.view_texts
    return calibration_view(*ctx.parts, texts, ctx.cfg.num_positions, **ctx.sampling, **ctx.decoding, source=source)


plot = table_plot("plot_calibration", "layers", "bins")
