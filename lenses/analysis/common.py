"""Pieces shared by the analysis views: their result type and a few token helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError


@dataclass
class ViewResult:
    """Tidy tables of one view (name -> DataFrame, each written as ``<view>_<name>.csv``), a few
    lines of summary for the terminal, and the settings its figure needs."""

    view: str
    tables: dict[str, pd.DataFrame]
    summary: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def write(self, out: str | os.PathLike) -> list[Path]:
        """Write every table as CSV and the view's figure as ``<view>.png`` into ``out``."""
        from ..io import write_csv
        from . import get_view

        out = Path(out)
        written = [write_csv(out / f"{self.view}_{name}.csv", table) for name, table in self.tables.items()]
        if self.settings.get("empty"):
            from ..plots import plot_message

            written.append(plot_message(self.settings["empty"], out / f"{self.view}.png"))
        else:
            written.append(get_view(self.view).plot(self, out / f"{self.view}.png"))
        return written


def nothing_to_score(view: str, positions: pd.DataFrame, why: str) -> ViewResult:
    """The result of a view that traced its items but has nothing to score: the trace, and why."""
    return ViewResult(view, {"positions": positions}, [f"nothing to score: {why}"], {"empty": why})


def table_plot(figure: str, *tables: str):
    """A view's ``plot(result, path)``: `lenses.plots` function ``figure`` drawn from the named tables."""

    def plot(result: ViewResult, path):
        from .. import plots

        return getattr(plots, figure)(*(result.tables[t] for t in tables), path)

    return plot


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def early_layers(num_layers: int) -> range:
    """The 'early' layers of the paper's refinement statistic: 1 .. ceil(L/4)."""
    return range(1, max(1, -(-num_layers // 4)) + 1)


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the last layer (the model's own prediction) of a trace table."""
    return df[df.layer == df.layer.max()]


def keep_where_final(df: pd.DataFrame, mask_col: str) -> pd.DataFrame:
    """Keep whole trajectories (lens, item, position) whose last-layer row satisfies ``mask_col``."""
    last = final_rows(df)
    good = last.loc[last[mask_col], ["lens", "item", "position"]]
    return df.merge(good, on=["lens", "item", "position"])


def require(condition: bool, message: str) -> None:
    if not condition:
        raise DataError(message)


def mean_or_nan(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def held_out_blocks(texts: list[str], tokenizer, seq_len: int, num_positions: int, seed: int, view: str):
    """``(chosen, blocks)``: the held-out blocks of ``texts`` and the indices, in a seeded random order,
    of as many of them as ``num_positions`` scored positions need at ``seq_len - 1`` per block."""
    import random

    from ..data import make_blocks

    _, held = make_blocks(texts, tokenizer, seq_len)
    n_blocks = min(len(held), -(-num_positions // (seq_len - 1)))
    require(n_blocks > 0, f"no held-out text for the {view} view; pass more text with --corpus.")
    return random.Random(seed).sample(range(len(held)), n_blocks), held
