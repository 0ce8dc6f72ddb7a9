"""Frequency view (Gupta et al. 2025, arXiv 2510.18871, section 4.1): are early-layer guesses
dominated by frequent tokens, and are they later refined?

Protocol (``prompts="paragraphs"``, the default), as the paper: each prompt is one held-out
paragraph of more than 200 characters (with the Wikipedia corpus: one article's lead section), cut
at a random word; every layer's top-1 is read at the last position of the prefix. In a causal
model that position computes exactly what it computes inside the whole paragraph, so the paragraph
runs once with the cut position marked. Frequency ranks are counted on the whole corpus, the text
the prompts come from. ``prompts="blocks"`` samples word-boundary positions of held-out token
blocks instead (several per block, ranks counted on the training blocks), for text without
paragraphs.

Per lens and layer we report the share of top-1 guesses in each frequency-rank bucket (1-10,
11-100, 101-1000, 1001+) next to the share among final predictions; the flip rate of guesses per
bucket (a guess is "refined" when it differs from the final top-1); and the mean probability mass
each lens puts on each bucket.
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult, early_layers, encode, require, table_plot
from lenses.model.adapter import ModelAdapter
from lenses.text import convention
from lenses.text.data import pack, tokenize
from lenses.text.frequency import BUCKET_NAMES, TokenFrequencies
from lenses.tracing.depth import flipped, trajectories
from lenses.tracing.intervals import describe, share_interval
from lenses.tracing.trace import TraceItem, trace


def word_starts(tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab] bool: the token's text begins with whitespace, i.e. a word boundary comes before it
    (BPE tokens carry their leading space; for a character-level tokenizer it is the space itself)."""
    ids = [[i] for i in range(vocab_size)]
    texts = tokenizer.batch_decode(ids) if hasattr(tokenizer, "batch_decode") else [tokenizer.decode(i) for i in ids]
    return torch.tensor([t[:1].isspace() for t in texts])


def frequency_items(blocks: torch.Tensor, starts: torch.Tensor, num_positions: int, min_context: int = 16,
                    eos: int | None = None, seed: int = 0) -> list[TraceItem]:
    """Sample up to ``num_positions`` word-boundary positions, spread evenly over ``blocks``."""
    rng = random.Random(seed)
    per_block = max(1, -(-num_positions // max(1, len(blocks))))
    items, total = [], 0
    for block in blocks:
        ids = block.tolist()
        ok = [t for t in range(min_context, len(ids) - 1)
              if starts[ids[t + 1]] and ids[t] != eos and ids[t + 1] != eos]
        take = sorted(rng.sample(ok, min(per_block, len(ok), num_positions - total)))
        if take:
            items.append(TraceItem(ids, take, {"next": [ids[t + 1] for t in take]}))
            total += len(take)
        if total >= num_positions:
            break
    return items


def paragraphs_of(documents: list[str], min_chars: int = 200) -> list[str]:
    """The paragraphs (blank-line separated) of more than ``min_chars`` characters."""
    return [p.strip() for d in documents for p in d.split("\n\n") if len(p.strip()) > min_chars]


def paragraph_items(tokenizer, documents: list[str], starts: torch.Tensor, num_prompts: int, min_chars: int = 200,
                    seed: int = 0) -> list[TraceItem]:
    """One prompt per paragraph of more than ``min_chars`` characters (up to ``num_prompts``, drawn with
    ``seed``), cut at a random word: the marked position is the last token before a word start."""
    rng = random.Random(seed)
    first = convention.of(tokenizer).first
    paragraphs = paragraphs_of(documents, min_chars)
    rng.shuffle(paragraphs)
    items = []
    for text in paragraphs:
        ids = encode(tokenizer, text)  # the tokenizer's prefix (BOS) first, as in use; it is never a cut
        cuts = [t for t in range(first, len(ids) - 1) if starts[ids[t + 1]]]
        if cuts:
            t = rng.choice(cuts)
            items.append(TraceItem(ids[: t + 1], [t], {"next": [ids[t + 1]]}))
        if len(items) >= num_prompts:
            break
    return items


def frequency_view(
    adapter: ModelAdapter,
    tokenizer,
    lenses: dict,
    texts: list[str],
    freqs: TokenFrequencies | None = None,
    num_positions: int = 1000,
    seq_len: int = 256,
    seed: int = 0,
    progress: bool = False, batch_size: int = 1, dtype: torch.dtype = torch.float32,
    prompts: str = "paragraphs",
    source: str = "the texts given",
) -> ViewResult:
    """Run the frequency view on ``texts`` (the analysis CLI passes the held-out part of a lens's training
    corpus, or all of your own text): ``num_positions`` paragraph prompts, or positions of blocks (see the
    module docstring). ``freqs`` defaults to counts over ``texts``."""
    require(prompts in ("paragraphs", "blocks"), f"unknown prompt protocol {prompts!r}: use paragraphs or blocks.")
    starts = word_starts(tokenizer, adapter.vocab_size)
    if freqs is None:
        freqs = TokenFrequencies.from_tokens(tokenize(texts, tokenizer), adapter.vocab_size)
    if prompts == "paragraphs":
        items = paragraph_items(tokenizer, texts, starts, num_positions, seed=seed)
        available, unit = len(paragraphs_of(texts)), "paragraph prompts (one position each)"
        require(bool(items), "no paragraph of more than 200 characters; pass more text with --corpus, or "
                             "use --freq-prompts blocks for text without blank-line paragraphs.")
    else:
        blocks = pack(tokenize(texts, tokenizer), seq_len, convention.of(tokenizer).prefix)
        items = frequency_items(blocks, starts, num_positions, eos=tokenizer.eos_token_id, seed=seed)
        available, unit = len(blocks) * (seq_len - 1), "positions (word boundaries of blocks)"
        require(bool(items), "no word-boundary positions found in the text; pass more text with --corpus.")
    usage = Usage(unit, num_positions, available, sum(len(it.positions) for it in items), source)
    require(len(freqs.counts) >= adapter.vocab_size,
            f"the frequency counts cover {len(freqs.counts)} tokens but the model has {adapter.vocab_size}: "
            "they were counted with another tokenizer. Count them on your corpus (omit --frequencies).")
    buckets = freqs.bucket(torch.arange(adapter.vocab_size))
    df = trace(adapter, lenses, items, groups=buckets, group_names=BUCKET_NAMES, progress=progress,
               batch_size=batch_size, dtype=dtype)
    ids = df.top1_id.to_numpy()
    names = np.asarray(BUCKET_NAMES, dtype=object)[buckets.numpy()[np.clip(ids, 0, None)]]
    names[ids < 0] = None  # a layer the lens does not read
    df["top1_bucket"] = names
    keys, top1 = trajectories(df, "top1_id")
    df["final_top1_id"] = np.repeat(top1[:, -1], top1.shape[1])
    df["flipped"] = np.where(top1 < 0, np.nan, flipped(top1)).reshape(-1)
    layers = _layer_table(df, seed)
    return ViewResult("frequency", {"positions": df, "layers": layers}, _summary(layers, adapter.num_layers),
                      usage=[usage])


def _layer_table(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """lens, layer, bucket, share (ci_low, ci_high: its 95% interval, resampled by text), final_share,
    flip_rate, n_guesses, mean_mass."""
    L = int(df.layer.max())
    final_share = df[df.layer == L].groupby("lens").top1_bucket.value_counts(normalize=True)
    rows = []
    for (lens, layer), g in df.groupby(["lens", "layer"], sort=True):
        read = (g.top1_id >= 0).any()
        for b in BUCKET_NAMES:
            in_b = g[g.top1_bucket == b]
            share, lo, hi = share_interval(g.top1_bucket == b, g["item"], seed=seed) if read else (np.nan,) * 3
            rows.append({
                "lens": lens, "layer": layer, "bucket": b,
                "share": share, "ci_low": lo, "ci_high": hi,
                "final_share": float(final_share.get((lens, b), 0.0)),
                "flip_rate": float(in_b.flipped.mean()) if len(in_b) else np.nan,
                "n_guesses": len(in_b),
                "mean_mass": float(g[f"mass_{b}"].mean()),
            })
    return pd.DataFrame(rows)


def _summary(layers: pd.DataFrame, num_layers: int) -> list[str]:
    early = list(early_layers(num_layers))
    lines = []
    for lens, g in layers.groupby("lens", sort=False):
        top = g[g.bucket == BUCKET_NAMES[0]].set_index("layer")
        e = top.loc[early]
        refined = (e.flip_rate * e.n_guesses).sum() / max(1, e.n_guesses.sum())
        first = describe(top.share.loc[1], top.ci_low.loc[1], top.ci_high.loc[1], percent=True)
        lines.append(
            f"{lens:>6} lens: top-1 in ranks 1-10 at layer 1: {first} (final predictions: "
            f"{top.final_share.iloc[0]:.0%}); of early (layers {early[0]}-{early[-1]}) guesses in ranks 1-10, "
            f"{refined:.0%} are refined later; mass on ranks 1-10 at layer 1: {top.mean_mass.loc[1]:.2f} "
            f"(final {top.mean_mass.iloc[-1]:.2f})"
        )
    return lines


def run(ctx) -> ViewResult:
    freqs = (TokenFrequencies.load(ctx.cfg.frequencies) if ctx.cfg.frequencies
             else TokenFrequencies.from_tokens(ctx.corpus_tokens, ctx.adapter.vocab_size))  # the whole corpus
    texts, source = ctx.view_texts
    result = frequency_view(*ctx.parts, texts, freqs, ctx.cfg.num_positions, **ctx.sampling, **ctx.decoding,
                            prompts=ctx.cfg.freq_prompts, source=source)
    result.usage[0].notes.append(f"token frequencies from {ctx.cfg.frequencies or 'all of ' + ctx.corpus_name}")
    return result


plot = table_plot("plot_frequency", "layers")
