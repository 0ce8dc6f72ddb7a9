"""Sub-layer view: which part of a block refines the guess, attention (the mixer) or the MLP?

A *refinement event* is a position and layer ``l`` where a lens's top-1 at layer ``l + 1`` differs from its
top-1 at layer ``l``. Block ``l`` adds ``attn[l] + mlp[l]`` to the residual stream
(`ModelAdapter.residual_parts`); the mid-block state ``hidden[l] + attn[l]`` is a half layer, read by
every lens with layer ``l``'s reading (a tuned lens with translator ``l``, a Jacobian lens with ``J_l``:
no lens here was trained on half layers). Two readings of each event:

- **which part** (``part``): ``attention`` if the half layer's top-1 is already the new token, ``mlp`` if
  it is still the old one, ``both`` if it is a third token;
- **direct contribution** (``attn_margin``, ``mlp_margin``): how much each part moves the new token's
  logit above the old one's, through the lens's (affine) state map and the final norm linearised at
  the state after the block: ``(W[new] - W[old]) . J_norm(x) . S(v)`` with ``x`` the lens's state of
  ``hidden[l + 1]``, ``S`` the linear part of the lens's state map and ``v`` the part (before logit
  scaling or soft-capping; the two margins add up to the first-order change).

Tables: ``events`` (one row per event), ``layers`` (per lens and layer: events and the share made by each
part, with 95% intervals resampled by text, mean margins), ``buckets`` (the same by the frequency bucket
of the new token). Hidden states and parts are made for one batch of blocks at a time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lenses import engine
from lenses.analysis.common import Usage, ViewResult, prefix_note, require, table_plot, text_blocks
from lenses.text.data import tokenize
from lenses.text.frequency import BUCKET_NAMES, TokenFrequencies
from lenses.tracing.intervals import describe, share_interval

PARTS = ("attention", "mlp", "both")


def margins(adapter, lens, layer: int, h_after: torch.Tensor, part: torch.Tensor, new: torch.Tensor,
            old: torch.Tensor) -> torch.Tensor:
    """``(W[new] - W[old]) . J_norm(x) . S(part)`` per row: the first-order change of the new token's logit over
    the old one's that ``part`` [N, d] makes, read by ``lens`` at ``layer`` (``x = lens.state(h_after)``)."""
    x = lens.state(h_after, layer)
    linear = lens.state(part, layer) - lens.state(torch.zeros_like(part), layer)  # an affine map's linear part
    _, jv = torch.func.jvp(adapter.final_norm, (x,), (linear,))
    w_new, w_old = adapter.unembed_rows(new[:, None])[:, 0], adapter.unembed_rows(old[:, None])[:, 0]
    return ((w_new - w_old) * jv.float()).sum(-1)


def _events(adapter, lens, name: str, h, attn, mlp, items: np.ndarray, positions: np.ndarray,
            dtype) -> list[dict]:
    """The refinement events of one lens over a batch of positions (``h`` [L+1, N, d], parts [L, N, d])."""
    L, rows = adapter.num_layers, []
    before = engine.top1_ids(adapter, lens.state(h[0], 0), dtype) if lens.has_layer(0) else None
    for layer in range(L):
        after = engine.top1_ids(adapter, lens.state(h[layer + 1], layer + 1), dtype)
        if before is not None:
            changed = (after != before).nonzero().flatten()
            if len(changed):
                c = changed
                mid = engine.top1_ids(adapter, lens.state(h[layer, c] + attn[layer, c], layer), dtype)
                part = np.where((mid == after[c]).numpy(), "attention",
                                np.where((mid == before[c]).numpy(), "mlp", "both"))
                am = margins(adapter, lens, layer + 1, h[layer + 1, c], attn[layer, c], after[c], before[c])
                mm = margins(adapter, lens, layer + 1, h[layer + 1, c], mlp[layer, c], after[c], before[c])
                for j, i in enumerate(c.tolist()):
                    rows.append({"lens": name, "item": int(items[i]), "position": int(positions[i]), "layer": layer,
                                 "old_id": int(before[i]), "new_id": int(after[i]), "mid_id": int(mid[j]),
                                 "part": part[j], "attn_margin": float(am[j]), "mlp_margin": float(mm[j])})
        before = after
    return rows


def sublayer_view(adapter, tokenizer, lenses: dict, texts: list[str], freqs: TokenFrequencies | None = None,
                  num_positions: int = 500, seq_len: int = 128, seed: int = 0, progress: bool = False,
                  batch_size: int = 1, dtype: torch.dtype = torch.float32,
                  source: str = "the texts given") -> ViewResult:
    """Run the sub-layer view on ``num_positions`` positions of blocks of ``seq_len`` tokens of ``texts``
    (``freqs``: token frequencies for the buckets; default: counted on ``texts``)."""
    from tqdm.auto import tqdm

    adapter.block_parts  # refuses, with the reason, a model whose blocks do not split into two parts
    chosen, blocks, available, first = text_blocks(texts, tokenizer, seq_len, num_positions, seed, "sublayer")
    if freqs is None:
        freqs = TokenFrequencies.from_tokens(tokenize(texts, tokenizer), adapter.vocab_size)
    require(len(freqs.counts) >= adapter.vocab_size, "the frequency counts were made with another tokenizer; "
                                                     "count them on your corpus (omit --frequencies).")
    rows, used = [], 0
    step = max(1, batch_size)
    with torch.no_grad():
        for s in tqdm(range(0, len(chosen), step), desc="sub-layer", unit="batch", disable=not progress):
            group = chosen[s : s + step]
            ids = torch.stack([blocks[b] for b in group])
            parts = adapter.residual_parts(ids, with_hidden=True)
            n = min(ids.shape[0] * (seq_len - 1 - first), num_positions - used)
            h, attn, mlp = (parts[k][:, :, first:-1].flatten(1, 2)[:, :n] for k in ("hidden", "attn", "mlp"))
            items = np.repeat(np.asarray(group), seq_len - 1 - first)[:n]
            positions = np.tile(np.arange(first, seq_len - 1), len(group))[:n]
            for name, lens in lenses.items():
                rows += _events(adapter, lens, name, h, attn, mlp, items, positions, dtype)
            used += n
            if used >= num_positions:
                break
    events = pd.DataFrame(rows, columns=["lens", "item", "position", "layer", "old_id", "new_id", "mid_id", "part",
                                         "attn_margin", "mlp_margin"])
    events["new_bucket"] = np.asarray(BUCKET_NAMES, dtype=object)[freqs.bucket(
        torch.tensor(events.new_id.to_numpy(), dtype=torch.long)).numpy()] if len(events) else []
    layers = _shares(events, ["lens", "layer"], seed)
    events["new_bucket"] = pd.Categorical(events.new_bucket, categories=BUCKET_NAMES, ordered=True)
    buckets = _shares(events, ["lens", "new_bucket"], seed)
    usage = Usage("positions", num_positions, available, used, source, prefix_note(tokenizer))
    return ViewResult("sublayer", {"events": events, "layers": layers, "buckets": buckets},
                      _summary(events, used, seed), usage=[usage])


def _shares(events: pd.DataFrame, by: list[str], seed: int) -> pd.DataFrame:
    """Per group: events, the share each part made (with its 95% interval, by text), the mean margins."""
    out = []
    for key, g in events.groupby(by, sort=True, observed=True):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)), events=len(g))
        for part in PARTS:
            share, lo, hi = share_interval(g.part == part, g["item"], seed=seed)
            row.update({f"share_{part}": share, f"share_{part}_ci_low": lo, f"share_{part}_ci_high": hi})
        row.update(mean_attn_margin=g.attn_margin.mean(), mean_mlp_margin=g.mlp_margin.mean())
        out.append(row)
    return pd.DataFrame(out)


def _summary(events: pd.DataFrame, positions: int, seed: int) -> list[str]:
    lines = []
    for lens, g in events.groupby("lens", sort=False):
        shares = [f"{part} {describe(*share_interval(g.part == part, g['item'], seed=seed), percent=True)}"
                  for part in PARTS]
        larger = (g.mlp_margin > g.attn_margin).mean()
        lines.append(f"{lens:>6} lens: {len(g):,} refinement events over {positions:,} positions; made by "
                     f"{', '.join(shares)}; the MLP's direct contribution is the larger in {larger:.0%}")
    return lines or ["no refinement events: every lens's top-1 is the same at every layer"]


def run(ctx) -> ViewResult:
    freqs = (TokenFrequencies.load(ctx.cfg.frequencies) if ctx.cfg.frequencies
             else TokenFrequencies.from_tokens(ctx.corpus_tokens, ctx.adapter.vocab_size))
    texts, source = ctx.view_texts
    return sublayer_view(*ctx.parts, texts, freqs, ctx.cfg.num_positions, **ctx.sampling, **ctx.decoding,
                         source=source)


plot = table_plot("plot_sublayer", "layers", "buckets")
