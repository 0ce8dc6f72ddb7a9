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

import json
import random
from importlib import resources
from pathlib import Path

import pandas as pd
import torch

from lenses.analysis.common import (
    Usage,
    ViewResult,
    encode,
    keep_where_final,
    mean_or_nan,
    nothing_to_score,
    plain_ids,
    require,
    table_plot,
)
from lenses.base import schema
from lenses.base.errors import DataError
from lenses.model.adapter import ModelAdapter
from lenses.text.chat import chat_turn
from lenses.text.data import jsonl_records, read_utf8
from lenses.tracing.depth import depth_summary, onset_curve
from lenses.tracing.intervals import describe, mean_interval, share_interval
from lenses.tracing.trace import TraceItem, trace


def default_facts_path() -> Path:
    return Path(str(resources.files("lenses") / "datasets" / "facts.jsonl"))


def _records(obj, where: str) -> list[dict]:
    """The facts of one JSON record, in any of the three layouts, with string prompts and answers."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a fact must be a JSON object, not {type(obj).__name__}; expected "
                        "{prompt, answer}, "
                        "CounterFact's requested_rewrite or MQuAKE's single_hops.")
    try:
        if "prompt" in obj or "answer" in obj:  # the plain layout: its fields are checked below
            facts = [{k: obj[k] for k in ("prompt", "answer", "relation", "subject") if k in obj}]
        elif "requested_rewrite" in obj:  # CounterFact
            rw = obj["requested_rewrite"]
            rw = rw[0] if isinstance(rw, list) else rw
            facts = [{"prompt": rw["prompt"].format(rw["subject"]), "answer": rw["target_true"]["str"],
                      "relation": rw.get("relation_id", ""), "subject": rw["subject"]}]
        elif "single_hops" in obj:  # MQuAKE
            facts = [{"prompt": h["cloze"], "answer": h["answer"]} for h in obj["single_hops"]]
        else:
            raise DataError(f"{where}: unknown fact layout (keys {sorted(obj)[:6]}); expected {{prompt, answer}}, "
                            "CounterFact's requested_rewrite or MQuAKE's single_hops.")
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
        raise DataError(f"{where}: the record does not have the expected fields ({type(e).__name__}: {e}); expected "
                        "{prompt, answer}, CounterFact's requested_rewrite.prompt/subject/target_true.str or "
                        "MQuAKE's single_hops[].cloze/answer.") from e
    return [schema.check(f, schema.FACT, where, "a fact with no empty prompt or answer, " + schema.FACT_EXAMPLE)
            for f in facts]


def read_facts(path: str | Path | None = None) -> list[dict]:
    """Facts as ``{prompt, answer, relation?, subject?}`` dicts from a JSONL file (or a JSON list)."""
    path = Path(path) if path else default_facts_path()
    if not path.is_file():
        raise DataError(f"fact file {path} does not exist; pass a JSONL file of {{prompt, answer}} with --facts.")
    text = read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno} is not valid JSON ({e.msg}); fix the file.") from e
        objs = [(f"{path} item {i}", o) for i, o in enumerate(records)]
    else:
        objs = jsonl_records(path)
    facts = [r for where, o in objs for r in _records(o, where)]
    require(bool(facts), f"{path} holds no facts; each line must be one JSON fact like "
                         '{"prompt": "The capital of France is", "answer": "Paris"}.')
    return facts


CHAT_REQUEST = "Complete this sentence: {prompt}"


def fact_items(tokenizer, facts: list[dict], chat: bool = False,
               system: str | None = None) -> tuple[list[TraceItem], pd.DataFrame]:
    """Prompt + " " + answer as one teacher-forced sequence; positions predict each answer token. With
    ``chat``, the user turn of the chat template (`lenses.text.chat.chat_turn`, with ``system``) asks for the
    sentence (`CHAT_REQUEST`) and the assistant's turn says it, prompt then answer, as a chat model answers:
    the answer tokens are scored where they come in the assistant's turn."""
    items, rows = [], []
    for i, f in enumerate(facts):
        prompt = f["prompt"].rstrip()
        answer = " " + f["answer"].strip()
        p_ids, a_ids = encode(tokenizer, prompt), plain_ids(tokenizer, answer)
        if not p_ids or not a_ids:
            raise DataError(f"fact {i} ({prompt!r} -> {answer!r}) tokenises to nothing; check the text.")
        if tokenizer.decode(a_ids) != answer:
            raise DataError(f"fact {i}: the answer {answer!r} does not survive tokenisation (decodes to "
                            f"{tokenizer.decode(a_ids)!r}); fix its characters or drop it.")
        if chat:  # the user asks for the sentence; the assistant says it, answer included
            said = plain_ids(tokenizer, prompt)
            turn = chat_turn(tokenizer, CHAT_REQUEST.format(prompt=prompt), system, said + a_ids)
            ids, start = turn.ids, turn.answer_start + len(said)
        else:
            ids, start = p_ids + a_ids, len(p_ids)
        positions = [start - 1 + k for k in range(len(a_ids))]
        items.append(TraceItem(ids, positions, {"answer": a_ids}))
        for k, t in enumerate(a_ids):
            rows.append({"item": i, "position": positions[k], "answer_token": k + 1, "n_answer_tokens": len(a_ids),
                         "token": tokenizer.decode([t]), "prompt": prompt, "answer": answer.strip(),
                         "relation": f.get("relation", "")})
    return items, pd.DataFrame(rows)


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
