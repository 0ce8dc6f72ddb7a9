"""The generated tables of the views that act on the model (docs/results.md, "Testing what a lens reads"), read
from an analysis folder's tidy tables kept in docs/data/<run>/ (`scripts/doc_tables.py --from-run`). Each cell
is a mean with its 95% interval by text (or prompt, or item); a control is shown beside it as its mean."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def _cell(r, digits: int, percent: bool) -> str:
    scale, unit = (100, "%") if percent else (1, "")
    v, lo, hi = (r.value * scale, r.ci_low * scale, r.ci_high * scale)
    if pd.isna(lo):
        return f"{v:.{digits}f}{unit}"
    return f"{v:.{digits}f}{unit} [{lo:.{digits}f}, {hi:.{digits}f}]"


def by_layer(run: str, file: str, metric: str, main: str, control: str | None, digits: int = 2,
             percent: bool = False, markdown=None) -> tuple[str, str]:
    """One row per layer, per lens a column ``main`` (with its interval) and one for ``control`` (its mean)."""
    src = f"docs/data/{run}/{file}"
    t = pd.read_csv(ROOT / src)
    t = t[t.metric == metric]
    rows = {}
    for r in t.itertuples():
        if r.condition == main:
            rows.setdefault(r.layer, {})[f"{r.lens}: {main}"] = _cell(r, digits, percent)
        elif r.condition == control:
            rows.setdefault(r.layer, {})[f"{r.lens}: {control}"] = _cell(r, digits, percent).split(" [")[0]
    lenses = list(dict.fromkeys(t.lens))
    cols = [c for lens in lenses for c in (f"{lens}: {main}", f"{lens}: {control}") if control or c.endswith(main)]
    cols = [c for c in cols if any(c in row for row in rows.values())]
    df = pd.DataFrame([{"layer": layer, **{c: row.get(c, "—") for c in cols}} for layer, row in sorted(rows.items())])
    return src, markdown(df, "r" + "r" * len(cols))


def reference_agreement(markdown) -> tuple[str, str]:
    """docs/data/reference-agreement.csv, written by scripts/reference_agreement.py."""
    src = "docs/data/reference-agreement.csv"
    t = pd.read_csv(ROOT / src)
    t["max_difference"] = t.max_difference.map(lambda v: f"{v:.1e}")
    return src, markdown(t.rename(columns={"max_difference": "max difference"}), "lllr")
