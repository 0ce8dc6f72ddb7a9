"""Agreement view: how alike are the lenses, layer by layer? For every pair of lenses and every layer,
on held-out positions: the share of positions where their top-1 tokens agree, and the symmetric KL
(Jeffreys divergence, KL(p||q) + KL(q||p), nats) between their distributions. A layer one lens does
not read (the embeddings for a Jacobian lens) is NaN for its pairs.

Logits are made one chunk of positions and one layer at a time (``[chunk x vocab]`` per lens), never
``[layers x positions x vocab]``.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult, prefix_note, require, table_plot, text_blocks


def agreement_view(adapter, tokenizer, lenses: dict, texts: list[str], num_positions: int = 1000, seq_len: int = 128,
                   chunk: int = 256, seed: int = 0, progress: bool = False, batch_size: int = 1,
                   source: str = "the texts given") -> ViewResult:
    from tqdm.auto import tqdm

    require(len(lenses) >= 2, "the agreement view compares lenses: give at least two (e.g. --lens logit,tuned).")
    chosen, held, available, first = text_blocks(texts, tokenizer, seq_len, num_positions, seed, "agreement")
    L, names = adapter.num_layers, list(lenses)
    pairs = list(combinations(names, 2))
    sums = {(a, b): np.zeros((L + 1, 2)) for a, b in pairs}  # [layer, (agree, sym_kl)]
    count = 0
    order = sorted(chosen)
    groups = [order[s : s + max(1, batch_size)] for s in range(0, len(order), max(1, batch_size))]
    with torch.no_grad():
        for group in tqdm(groups, desc="agreement", unit="batch", disable=not progress):
            # blocks of equal length: one forward pass for the batch, no padding
            hidden = adapter.hidden_states(held[group])[:, :, first:-1].flatten(1, 2)  # [L+1, B*(seq-1-first), d]
            hidden = hidden[:, : num_positions - count]
            for s in range(0, hidden.shape[1], chunk):
                h = hidden[:, s : s + chunk]
                for layer in range(L + 1):
                    logp = {n: torch.log_softmax(lens(h[layer], layer).float(), -1) for n, lens in lenses.items()
                            if lens.has_layer(layer)}
                    for a, b in pairs:
                        if a not in logp or b not in logp:
                            sums[(a, b)][layer] = np.nan
                            continue
                        p, q = logp[a], logp[b]
                        agree = (p.argmax(-1) == q.argmax(-1)).float().sum()
                        jeffreys = ((p.exp() - q.exp()) * (p - q)).sum(-1).clamp_min(0).sum()
                        sums[(a, b)][layer] += [float(agree), float(jeffreys)]
            count += hidden.shape[1]
            if count >= num_positions:
                break
    rows = [{"lens_a": a, "lens_b": b, "layer": layer, "top1_agreement": v[layer, 0] / count,
             "sym_kl": v[layer, 1] / count, "n": count} for (a, b), v in sums.items() for layer in range(L + 1)]
    table = pd.DataFrame(rows)
    return ViewResult("agreement", {"layers": table}, _summary(table, L),
                      usage=[Usage("positions", num_positions, available, count, source, prefix_note(tokenizer))])


def _summary(table: pd.DataFrame, L: int) -> list[str]:
    lines = []
    mid = L // 2
    for (a, b), g in table.groupby(["lens_a", "lens_b"], sort=False):
        g = g.set_index("layer")
        lines.append(f"{a} vs {b}: top-1 agreement {g.top1_agreement.loc[1]:.0%} at layer 1, "
                     f"{g.top1_agreement.loc[mid]:.0%} at layer {mid}, {g.top1_agreement.loc[L - 1]:.0%} at layer "
                     f"{L - 1}; symmetric KL {g.sym_kl.loc[mid]:.2f} nats at layer {mid}")
    return lines


def run(ctx) -> ViewResult:
    texts, source = ctx.view_texts
    return agreement_view(*ctx.parts, texts, ctx.cfg.num_positions, **ctx.sampling, source=source)


plot = table_plot("plot_agreement", "layers")
