#!/usr/bin/env python
"""Rebuild the fact-recall and multiple-choice sets shipped in lenses/datasets/ from real data.

Source: the `countryinfo` package (MIT; capitals, languages, currencies and regions of ~250
countries) with `pycountry` (LGPL-2.1; ISO 639 / ISO 4217 names) to turn codes into names.
Neither is needed at run time: the output files are committed. Deterministic (seed 0).

    pip install countryinfo==1.0.1 pycountry==26.2.16
    python scripts/make_datasets.py
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from pathlib import Path

import countryinfo
import pycountry

OUT = Path(__file__).resolve().parent.parent / "lenses" / "datasets"


def _language(code: str) -> str | None:
    lang = pycountry.languages.get(alpha_2=code) or pycountry.languages.get(alpha_3=code)
    return getattr(lang, "name", None)


def _currency(code: str) -> str | None:
    cur = pycountry.currencies.get(alpha_3=code)
    return getattr(cur, "name", None)


def _text(value) -> str:
    if isinstance(value, list):  # a few countries list several capitals: keep the first
        value = value[0] if value else ""
    return str(value or "").strip()


def countries() -> list[dict]:
    rows = []
    for c in countryinfo.all_countries():
        info = c.info()
        name = info.get("name")
        if not name:
            continue
        langs = [n for n in (_language(x) for x in info.get("languages") or []) if n]
        curs = [n for n in (_currency(x) for x in info.get("currencies") or []) if n]
        rows.append(
            {
                "country": name,
                "capital": _text(info.get("capital")),
                "language": langs[0] if langs else "",
                "currency": curs[0] if curs else "",
                "region": _text(info.get("region")),
                "subregion": _text(info.get("subregion")),
            }
        )
    return sorted(rows, key=lambda r: r["country"])


TEMPLATES = {  # relation -> (cloze prompt, field)
    "capital": ("The capital of {country} is", "capital"),
    "language": ("The official language of {country} is", "language"),
    "currency": ("The official currency of {country} is the", "currency"),
    "region": ("{country} is a country in the region of", "subregion"),
}


def facts(rows: list[dict]) -> list[dict]:
    out = []
    for relation, (template, field) in TEMPLATES.items():
        for r in rows:
            if r[field]:
                out.append({"prompt": template.format(**r), "answer": r[field], "relation": relation,
                            "subject": r["country"]})
    return out


QUESTIONS = {  # field -> question
    "capital": "What is the capital city of {country}?",
    "currency": "Which currency is the official currency of {country}?",
    "region": "On which continent or world region does {country} lie?",
}


def mcq(rows: list[dict], rng: random.Random) -> list[list[str]]:
    items = []
    for field, question in QUESTIONS.items():
        pool = sorted({r[field] for r in rows if r[field]})
        for r in rows:
            if not r[field] or len(pool) < 4:
                continue
            wrong = rng.sample([x for x in pool if x != r[field]], 3)
            options = wrong + [r[field]]
            rng.shuffle(options)
            items.append([question.format(**r), *options, "ABCD"[options.index(r[field])]])
    rng.shuffle(items)
    return items


def main() -> int:
    rng = random.Random(0)
    rows = countries()
    OUT.mkdir(parents=True, exist_ok=True)
    fs = facts(rows)
    (OUT / "facts.jsonl").write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in fs), encoding="utf-8")
    qs = mcq(rows, rng)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(qs)  # MMLU layout: no header
    (OUT / "mcq.csv").write_text(buf.getvalue(), encoding="utf-8")
    print(f"{len(rows)} countries -> {len(fs)} facts, {len(qs)} questions in {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
