"""Multiple-choice view (Gupta et al. 2025, arXiv 2510.18871, section 4.4): does the model find
the answer format (the option letters) before it settles on an answer?

Prompt: a fixed few-shot prefix (the first ``shots`` rows of the data, solved), then the item as
"Question: ...\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\nAnswer:". The option tokens are " A" .. " D".
Per layer: rank and probability of every option letter. Per question:
- format found: first layer where every option letter ranks within the top 4 (the number of
  options); format settled: first layer from which that stays true;
- answer found: first layer where the correct letter is top-1;
- choice settled: first layer from which the model's final choice (the letter it puts the most
  probability on at the last layer) stays top-1.

Default data: ``lenses/datasets/mcq.csv``, 736 four-option questions about countries (capitals,
currencies, regions) built by ``scripts/make_datasets.py`` from ``countryinfo``/``pycountry``,
in MMLU's CSV layout (question, A, B, C, D, answer; no header), so MMLU files load as they are.
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import torch

from lenses.analysis.common import Usage, ViewResult, encode, plain_ids, require, table_plot
from lenses.base.errors import DataError
from lenses.model.adapter import ModelAdapter
from lenses.text.chat import chat_turn
from lenses.text.questions import HEADER, LETTERS, format_question, read_mcq
from lenses.tracing.depth import onset_layer, settled_layer, trajectories
from lenses.tracing.intervals import describe, mean_interval
from lenses.tracing.trace import TraceItem, trace


def option_ids(tokenizer, space: str = " ") -> list[int]:
    """The token of each option letter (after a space in raw text; alone as the assistant's first token)."""
    ids = []
    for letter in LETTERS:
        t = plain_ids(tokenizer, space + letter)
        if len(t) != 1:
            raise DataError(f"the option {space + letter!r} is {len(t)} tokens for this tokenizer; the MCQ view "
                            "needs each option letter to be one token.")
        ids += t
    return ids


def mcq_view(
    adapter: ModelAdapter,
    tokenizer,
    lenses: dict,
    questions: list[dict] | None = None,
    num_questions: int | None = 100,
    shots: int = 4,
    seed: int = 0,
    progress: bool = False, batch_size: int = 1, dtype: torch.dtype = torch.float32,
    chat: bool = False, system: str | None = None,
) -> ViewResult:
    """Run the MCQ view: the first ``shots`` questions form the prefix, then up to ``num_questions``
    of the rest (sampled with ``seed``) are scored. ``chat``: the prefix and question are the user turn of
    the chat template (with ``system``), the letter is scored as the assistant's first token."""
    questions = list(questions if questions is not None else read_mcq())
    require(len(questions) > shots, f"the MCQ view needs more than {shots} questions ({shots} are used as examples).")
    prefix = HEADER + "".join(format_question(q, solved=True) for q in questions[:shots])
    pool = questions[shots:]
    if num_questions is not None and num_questions < len(pool):
        pool = random.Random(seed).sample(pool, num_questions)
    opts = option_ids(tokenizer, "" if chat else " ")
    items = []
    for q in pool:
        text = prefix + format_question(q, solved=False)
        ids = chat_turn(tokenizer, text, system).ids if chat else encode(tokenizer, text)
        items.append(TraceItem(ids, [len(ids) - 1], {l: [t] for l, t in zip(LETTERS, opts)}))
    df = trace(adapter, lenses, items, progress=progress, batch_size=batch_size, dtype=dtype)
    df["letter_mass"] = df[[f"prob_{l}" for l in LETTERS]].sum(axis=1)
    gold = np.array([LETTERS.index(q["answer"]) for q in pool])
    df["gold"] = np.asarray(LETTERS)[gold[df.item.to_numpy()]]
    df["prob_gold"] = df[[f"prob_{l}" for l in LETTERS]].to_numpy()[np.arange(len(df)), gold[df.item.to_numpy()]]
    df["rank_gold"] = df[[f"rank_{l}" for l in LETTERS]].to_numpy()[np.arange(len(df)), gold[df.item.to_numpy()]]
    per_q = _question_table(df, gold)
    layers = _layer_table(df)
    return ViewResult("mcq", {"positions": df, "questions": per_q, "layers": layers}, _summary(per_q, layers, seed))


def _question_table(df: pd.DataFrame, gold: np.ndarray) -> pd.DataFrame:
    keys, _ = trajectories(df, "layer")
    ranks = np.stack([trajectories(df, f"rank_{l}")[1] for l in LETTERS], -1)  # [Q, layers, 4]
    probs = np.stack([trajectories(df, f"prob_{l}")[1] for l in LETTERS], -1)
    fmt = (ranks <= len(LETTERS)).all(-1)
    choice = probs[:, -1].argmax(-1)
    q = np.arange(len(keys))
    g = gold[keys.item.to_numpy()]
    out = keys[["lens", "item"]].copy()
    out["gold"] = np.asarray(LETTERS)[g]
    out["choice"] = np.asarray(LETTERS)[choice]
    out["correct"] = choice == g
    out["choice_is_top1"] = ranks[q, -1, choice] == 1
    out["format_found"] = onset_layer(np.where(fmt, 1, 2), 1)
    out["format_settled"] = settled_layer(fmt)
    out["answer_found"] = onset_layer(ranks[q, :, g], 1)
    out["choice_settled"] = settled_layer(ranks[q, :, choice] == 1)
    out["num_layers"] = ranks.shape[1] - 1
    return out


def _layer_table(df: pd.DataFrame) -> pd.DataFrame:
    """lens, layer, letter_mass, prob_gold, gold_top1 (share), format_share, median_rank_gold."""
    g = df.assign(format_ok=(df[[f"rank_{l}" for l in LETTERS]] <= len(LETTERS)).all(axis=1),
                  gold_top1=df.rank_gold == 1)
    return g.groupby(["lens", "layer"], sort=True).agg(
        letter_mass=("letter_mass", "mean"), prob_gold=("prob_gold", "mean"), gold_top1=("gold_top1", "mean"),
        format_share=("format_ok", "mean"), median_rank_gold=("rank_gold", "median"), n=("item", "size"),
    ).reset_index()


def _summary(per_q: pd.DataFrame, layers: pd.DataFrame, seed: int = 0) -> list[str]:
    """Per lens, with 95% intervals (questions resampled; layers averaged over the questions that reach them)."""
    lines = []
    for lens, g in per_q.groupby("lens", sort=False):
        q = g["item"].to_numpy()

        def ci(column, percent=False):
            return describe(*mean_interval(g[column].to_numpy(dtype=float), q, seed=seed), percent=percent)

        common = g.choice.value_counts(normalize=True)
        lines.append(
            f"{lens:>6} lens: accuracy {ci('correct', True)} of {len(g)} (final top-1 is a letter for "
            f"{g.choice_is_top1.mean():.0%}; its most common choice, {common.index[0]}, for {common.iloc[0]:.0%}); "
            f"format found at layer {ci('format_found')} "
            f"(settled {ci('format_settled')}), final choice settled at {ci('choice_settled')}, "
            f"correct letter first top-1 at {ci('answer_found')}"
        )
    return lines


def run(ctx) -> ViewResult:
    questions = read_mcq(ctx.cfg.mcq)
    result = mcq_view(*ctx.parts, questions, ctx.cfg.num_questions, **ctx.sampling, **ctx.decoding, **ctx.chat_args)
    result.summary.insert(0, ctx.chat[1] + ("; the solved examples and the question are the user turn, the letter "
                                           "is scored as the assistant's first token" if ctx.chat[0] else ""))
    pool = max(0, len(questions) - 4)  # the first 4 are the solved examples of the prompt
    result.usage.append(Usage("questions", ctx.cfg.num_questions, pool, min(ctx.cfg.num_questions, pool),
                              ctx.cfg.mcq or "the shipped questions", ["4 more are the prompt's solved examples"]))
    return result


plot = table_plot("plot_mcq", "layers", "questions")
