"""Fact files: the shipped set (``lenses/datasets/facts.jsonl``) and the three layouts users bring
(``{prompt, answer}``, CounterFact, MQuAKE), read into ``{prompt, answer, relation?, subject?}`` dicts, and
made into items to trace (`fact_items`). The facts view and the causal swap benchmark read them."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pandas as pd

from lenses.base import schema
from lenses.base.errors import DataError
from lenses.text import convention
from lenses.text.chat import chat_turn
from lenses.text.data import jsonl_records, read_utf8
from lenses.tracing.trace import TraceItem


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
    if not facts:
        raise DataError(f"{path} holds no facts; each line must be one JSON fact like "
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
        p_ids, a_ids = convention.encode(tokenizer, prompt), convention.plain_ids(tokenizer, answer)
        if not p_ids or not a_ids:
            raise DataError(f"fact {i} ({prompt!r} -> {answer!r}) tokenises to nothing; check the text.")
        if tokenizer.decode(a_ids) != answer:
            raise DataError(f"fact {i}: the answer {answer!r} does not survive tokenisation (decodes to "
                            f"{tokenizer.decode(a_ids)!r}); fix its characters or drop it.")
        if chat:  # the user asks for the sentence; the assistant says it, answer included
            said = convention.plain_ids(tokenizer, prompt)
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
