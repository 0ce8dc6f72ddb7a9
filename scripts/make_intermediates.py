"""Write ``lenses/datasets/intermediates.jsonl``: two-hop questions built from the shipped facts
(``lenses/datasets/facts.jsonl``), each naming a country only by its capital, so the country is the intermediate
concept the model must recall on the way to the answer.

For every country with a capital fact and a currency / language / region fact, one item per second hop:

- currency: "The money used in the country whose capital city is {capital} is called the" -> currency
- language: "Most people in the country whose capital city is {capital} speak" -> language
- region:   "The country whose capital city is {capital} lies in the region of" -> region

with ``intermediates = [country]``. The templates are ours; the facts come from ``scripts/make_datasets.py``.
Run: ``python scripts/make_intermediates.py`` (deterministic; the file is committed).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = {
    "currency": "The money used in the country whose capital city is {capital} is called the",
    "language": "Most people in the country whose capital city is {capital} speak",
    "region": "The country whose capital city is {capital} lies in the region of",
}


def main() -> None:
    facts = [json.loads(line) for line in (ROOT / "lenses/datasets/facts.jsonl").read_text().splitlines() if line]
    by = {}
    for f in facts:
        by.setdefault(f["subject"], {})[f["relation"]] = f["answer"]
    items = []
    for country, known in by.items():
        capital = known.get("capital")
        if not capital or capital == country:  # a city-state names its own capital: no second hop
            continue
        for relation, template in TEMPLATES.items():
            if relation in known:
                items.append({"prompt": template.format(capital=capital), "answer": known[relation],
                              "intermediates": [country], "relation": f"capital->country->{relation}"})
    out = ROOT / "lenses/datasets/intermediates.jsonl"
    out.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    print(f"{len(items)} items -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
