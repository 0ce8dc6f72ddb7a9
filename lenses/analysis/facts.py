"""Fact-recall view (Gupta et al. 2025, arXiv 2510.18871, section 4.3): at what depth does each
token of a multi-token answer become the top-1 prediction?

Protocol, after the paper: the prompt is a cloze ("The capital of Burkina Faso is"), the answer is
appended with a leading space and teacher-forced. Answer token 1 is scored where the model's
greedy top-1 is right; each later token where the model predicts it correctly given the true
earlier tokens. Per answer-token index we report the onset at k (first layer where its rank <= k),
the first-correct layer (k = 1) and the settled layer.

Default data: ``lenses/datasets/facts.jsonl``, 974 cloze facts about countries (capital, official
language, currency, region) built by ``scripts/make_datasets.py`` from the ``countryinfo`` and
``pycountry`` packages. Users bring JSONL in any of three layouts: ``{"prompt", "answer"}``;
CounterFact (``requested_rewrite.prompt`` with ``{}`` for ``subject``, ``target_true.str``); MQuAKE
(``single_hops[].cloze`` / ``answer``).
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
    table_plot,
)
from lenses.model.adapter import ModelAdapter
from lenses.tracing.depth import depth_summary, onset_curve
from lenses.tracing.intervals import describe, mean_interval, share_interval
from lenses.tracing.facts_data import CHAT_REQUEST, default_facts_path, fact_items, read_facts  # noqa: F401
from lenses.tracing.trace import trace


def facts_view(
    adapter: ModelAdapter,
    tokenizer,
    lenses: dict,
    facts: list[dict] | None = None,
    num_facts: int | None = None,
    seed: int = 0,
    progress: bool = False, batch_size: int = 1, dtype: torch.dtype = torch.float32,
    chat: bool = False, system: str | None = None,
) -> ViewResult:
    """Run the fact-recall view (all shipped facts by default; ``num_facts`` samples with ``seed``); ``chat``:
    each prompt as the user turn of the chat template (see `fact_items`)."""
    facts = list(facts if facts is not None else read_facts())
    if num_facts is not None and num_facts < len(facts):
        facts = random.Random(seed).sample(facts, num_facts)
    items, tokens = fact_items(tokenizer, facts, chat, system)
    df = trace(adapter, lenses, items, progress=progress, batch_size=batch_size, dtype=dtype)
    df["correct"] = df.rank_answer == 1
    kept = keep_where_final(df, "correct")
    if kept.empty:
        return nothing_to_score("facts", df.merge(tokens, on=["item", "position"]),
                                f"the model predicts none of the {len(tokens)} answer tokens of {len(facts)} facts, so "
                                "there is no depth to measure; pass facts it knows (--facts).")
    summary = depth_summary(kept, "answer").merge(tokens, on=["item", "position"])
    summary["token_index"] = summary.answer_token.clip(upper=3).map({1: "1", 2: "2", 3: "3+"})
    by_index = _index_table(summary, tokens, lenses, seed)
    curves = onset_curve(summary, by=("lens", "token_index"))
    final = df[df.layer == df.layer.max()].merge(tokens, on=["item", "position"])
    recall = final[final.lens == next(iter(lenses))].groupby("item").correct.all()
    share = describe(*share_interval(recall.to_numpy(), recall.index.to_numpy(), seed=seed), percent=True)
    lines = [f"model recalls {share} of {len(recall)} facts exactly (greedy, teacher-forced per token)"]
    lines += _summary(by_index)
    return ViewResult("facts", {"positions": df.merge(tokens, on=["item", "position"]), "tokens": summary,
                                "by_index": by_index, "onset": curves}, lines)


def _index_table(summary: pd.DataFrame, tokens: pd.DataFrame, lenses: dict, seed: int = 0) -> pd.DataFrame:
    """lens, token_index, n_tokens, n_correct, the mean first-correct and settled layers with their 95% intervals
    (resampled by fact: the tokens of one answer are not independent), mean onsets at k = 10 and 100."""
    rows = []
    idx = tokens.answer_token.clip(upper=3).map({1: "1", 2: "2", 3: "3+"})
    totals = idx.value_counts()
    for (lens, index), g in summary.groupby(["lens", "token_index"], sort=True):
        first = mean_interval(g.first_correct, g["item"], seed=seed)
        settled = mean_interval(g.settled, g["item"], seed=seed)
        rows.append({"lens": lens, "token_index": index, "n_tokens": int(totals.get(index, 0)), "n_correct": len(g),
                     "mean_first_correct": first[0], "first_correct_ci_low": first[1],
                     "first_correct_ci_high": first[2], "mean_settled": settled[0], "settled_ci_low": settled[1],
                     "settled_ci_high": settled[2], "mean_onset_k10": mean_or_nan(g.onset_k10),
                     "mean_onset_k100": mean_or_nan(g.onset_k100)})
    return pd.DataFrame(rows)


def _summary(by_index: pd.DataFrame) -> list[str]:
    lines = []
    for lens, g in by_index.groupby("lens", sort=False):
        parts = [f"token {r.token_index}: first correct "
                 f"{describe(r.mean_first_correct, r.first_correct_ci_low, r.first_correct_ci_high)}, settled "
                 f"{describe(r.mean_settled, r.settled_ci_low, r.settled_ci_high)} (n={r.n_correct})"
                 for r in g.itertuples()]
        lines.append(f"{lens:>6} lens: " + "; ".join(parts))
    return lines


def run(ctx) -> ViewResult:
    facts = read_facts(ctx.cfg.facts)
    result = facts_view(*ctx.parts, facts, ctx.cfg.num_facts, **ctx.sampling, **ctx.decoding, **ctx.chat_args)
    result.summary.insert(0, ctx.chat[1] + (f"; the user turn asks {CHAT_REQUEST!r}, the assistant's turn says the "
                                           "sentence and its answer tokens are scored there" if ctx.chat[0] else ""))
    used = len(facts) if ctx.cfg.num_facts is None else min(ctx.cfg.num_facts, len(facts))
    result.usage.append(Usage("facts", ctx.cfg.num_facts, len(facts), used, ctx.cfg.facts or "the shipped facts"))
    return result


plot = table_plot("plot_facts", "by_index", "onset")
