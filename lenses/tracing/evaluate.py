"""Held-out evaluation of any lenses: per-layer KL(final || lens), and every layer's top-1 token.

Blocks of text run through the model in batches; each lens transforms a chunk of all layers x a
few positions at once (`Lens.transform_stack`) and the vocabulary engine compares it with the
model's own distribution (`lenses.engine.Teacher`, decoded once per block of positions and shared
by all lenses), so memory is O(chunk x vocab) whatever the number of layers or tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from lenses import engine
from lenses.model.adapter import ModelAdapter
from lenses.text import convention
from lenses.text.data import make_blocks, read_texts
from lenses.tracing.intervals import mean_interval


@dataclass
class HeldOut:
    """Per lens: ``kl`` [L] mean KL(final || lens) per layer (nats/token), ``top1`` [L+1, N] the lens's
    top-1 token at every layer and held-out position (row L: the model's own top-1), and ``block_kl``
    [blocks, L] the mean per block of text (for intervals that resample blocks)."""

    kl: dict[str, torch.Tensor]
    top1: dict[str, torch.Tensor]
    tokens_per_byte: float
    block_kl: dict[str, torch.Tensor] | None = None

    def table(self) -> pd.DataFrame:
        """Tidy per-layer KL: layer, lens, kl_nats, kl_bits_per_byte, and kl_low/kl_high, the 95% bootstrap
        interval of kl_nats resampling the blocks (NaN with one block)."""
        rows = []
        for name, values in self.kl.items():
            blocks = self.block_kl[name].numpy() if self.block_kl else None
            for layer, v in enumerate(values.tolist()):
                low, high = (mean_interval(blocks[:, layer], np.arange(len(blocks)))[1:] if blocks is not None
                             else (float("nan"), float("nan")))
                rows.append({"layer": layer, "lens": name, "kl_nats": v, "kl_low": low, "kl_high": high,
                             "kl_bits_per_byte": v * self.tokens_per_byte / math.log(2)})
        return pd.DataFrame(rows, columns=["layer", "lens", "kl_nats", "kl_low", "kl_high", "kl_bits_per_byte"])


def evaluate(adapter: ModelAdapter, lenses: dict, blocks: torch.Tensor, tokenizer=None, batch_size: int = 8,
             chunk_rows: int | None = None, dtype: torch.dtype = torch.float32,
             teacher_positions: int = 256, first: int | None = None) -> HeldOut:
    """Evaluate ``lenses`` (name -> `Lens`) on token ``blocks`` [n, seq]; ``tokenizer`` (optional)
    gives the bytes per token for the bits-per-byte column. The first ``first`` positions of each block
    (the tokenizer's special prefix, e.g. BOS: `lenses.text.convention` rule 5; by default read from
    ``tokenizer``, else 0) are not scored."""
    L = adapter.num_layers
    if first is None:
        first = convention.of(tokenizer).first if tokenizer is not None else 0
    width = blocks.shape[1] - first
    chunk_rows = chunk_rows or engine.default_chunk_rows(adapter, dtype)
    per_block = {name: torch.zeros(len(blocks), L, dtype=torch.float64) for name in lenses}
    top1: dict[str, list[torch.Tensor]] = {name: [] for name in lenses}
    with torch.no_grad():
        for b in range(0, len(blocks), batch_size):
            hidden = adapter.hidden_states(blocks[b : b + batch_size])[:, :, first:].flatten(1, 2)
            for b0, b1 in engine.blocks(0, hidden.shape[1], teacher_positions):
                teacher = engine.Teacher(adapter, hidden[L, b0:b1])
                ids = {name: [] for name in lenses}
                for s, e in engine.blocks(b0, b1, max(1, chunk_rows // L)):
                    block_of = b + torch.arange(s, e) // width
                    for name, lens in lenses.items():
                        h = lens.transform_stack(hidden[:L, s:e])
                        kl, top = engine.kl_rows(adapter, h, *teacher.rows(s - b0, e - b0), dtype)
                        per_block[name].index_add_(0, block_of, kl.T.double().cpu())
                        ids[name].append(top)
                for name in lenses:
                    top1[name].append(torch.cat([torch.cat(ids[name], dim=1), teacher.top1[None]]).cpu())
    scored = blocks[:, first:]
    n_bytes = sum(len(tokenizer.decode(row).encode("utf-8")) for row in scored.tolist()) if tokenizer else 0
    count = max(1, scored.numel())
    return HeldOut({name: per_block[name].sum(0) / count for name in lenses},
                   {name: torch.cat(top1[name], dim=1) for name in lenses},
                   scored.numel() / n_bytes if n_bytes else float("nan"),
                   {name: per_block[name] / width for name in lenses})


def cross_domain(adapter: ModelAdapter, tokenizer, lenses: dict, corpora: list[str] | dict[str, list[str]],
                 seq_len: int = 256, max_tokens: int = 8192, **kwargs) -> pd.DataFrame:
    """Held-out per-layer KL of every lens on the held-out split of every corpus (names or paths, or a dict
    name -> documents; the split `train_probes.py` uses, first ``max_tokens`` tokens). Tidy: corpus, layer,
    lens, kl_nats, kl_low, kl_high (interval by block), kl_bits_per_byte."""
    frames = []
    for corpus in corpora:
        texts = corpora[corpus] if isinstance(corpora, dict) else read_texts(corpus)
        _, held = make_blocks(texts, tokenizer, seq_len, max_eval_blocks=max(1, max_tokens // seq_len))
        table = evaluate(adapter, lenses, held, tokenizer, **kwargs).table()
        frames.append(table.assign(corpus=corpus))
    out = pd.concat(frames, ignore_index=True)
    return out[["corpus", "layer", "lens", "kl_nats", "kl_low", "kl_high", "kl_bits_per_byte"]]
