"""Pieces shared by the analysis views: their result type and a few token helpers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lenses.base.errors import DataError
from lenses.pages import figures
from lenses.text import convention
from lenses.text.data import pack, tokenize


@dataclass
class Usage:
    """How much data a view used: ``used`` of ``available`` ``unit`` (``requested`` asked for) from
    ``source``. Every view returns one or more, printed, written to ``report.json`` and shown on the page."""

    unit: str
    requested: int | None
    available: int
    used: int
    source: str
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        asked = "all" if self.requested is None else f"{self.requested:,}"
        text = f"data: {self.used:,} of {self.available:,} {self.unit} available (requested {asked}) from {self.source}"
        if self.requested is not None and self.used < self.requested:
            text += f"; fewer than requested: the text gives only {self.available:,}"
        return "; ".join([text, *self.notes])

    def record(self) -> dict:
        return {"unit": self.unit, "requested": self.requested, "available": self.available, "used": self.used,
                "source": self.source, "notes": list(self.notes)}


@dataclass
class ViewResult:
    """Tidy tables of one view (name -> DataFrame, each written as ``<view>_<name>.csv``), a few
    lines of summary for the terminal, the settings its figure needs, and the data it used."""

    view: str
    tables: dict[str, pd.DataFrame]
    summary: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    usage: list[Usage] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The summary with the data-accounting lines first."""
        return [u.line() for u in self.usage] + list(self.summary)


def nothing_to_score(view: str, positions: pd.DataFrame, why: str) -> ViewResult:
    """The result of a view that traced its items but has nothing to score: the trace, and why."""
    return ViewResult(view, {"positions": positions}, [f"nothing to score: {why}"], {"empty": why})


def table_plot(figure: str, *tables: str):
    """A view's ``plot(result, path)``: `lenses.pages.figures` function ``figure`` drawn from the named tables."""

    def plot(result: ViewResult, path):
        return getattr(figures, figure)(*(result.tables[t] for t in tables), path)

    return plot


def encode(tokenizer, text: str) -> list[int]:
    """A prompt or text as the model sees it in use: the tokenizer's prefix (BOS, where it adds one), then
    the text (`lenses.text.convention`)."""
    return convention.encode(tokenizer, text)


def plain_ids(tokenizer, text: str) -> list[int]:
    """A continuation's ids (an answer, an option letter, a label): no special tokens."""
    return convention.plain_ids(tokenizer, text)


def prefix_note(tokenizer) -> list[str]:
    """The data-accounting note of a view whose texts start with the tokenizer's special prefix."""
    conv = convention.of(tokenizer)
    if not conv.first:
        return []
    return [f"each text starts with the tokenizer's {tokenizer.decode(list(conv.prefix))!r} as in use; position"
            f"{'s' if conv.first > 1 else ''} 0{f'-{conv.first - 1}' if conv.first > 1 else ''} (special) not scored"]


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


def text_blocks(texts: list[str], tokenizer, seq_len: int, num_positions: int, seed: int, view: str):
    """``(chosen, blocks, available, first)``: all of ``texts`` packed into blocks of ``seq_len`` tokens, each
    starting as the model reads text (the tokenizer's ``first`` special tokens, e.g. BOS, then text), the
    indices (in a seeded random order) of as many blocks as ``num_positions`` scored positions need at
    ``seq_len - 1 - first`` per block (positions ``first .. seq_len - 2``: the special ones are not scored),
    and how many positions the blocks offer. (Which texts a view reads, all of a user's file or the held-out
    part of a lens's training corpus, is decided by `Context.view_texts`.)"""
    import random

    conv = convention.of(tokenizer)
    require(seq_len - 1 - conv.first >= 1, f"blocks of {seq_len} tokens leave no scored position after the "
                                           f"tokenizer's {conv.first} special token(s); use longer blocks.")
    blocks = pack(tokenize(texts, tokenizer), seq_len, conv.prefix)
    require(len(blocks) > 0, f"the text gives no block of {seq_len} tokens for the {view} view; pass more text "
                             "with --corpus.")
    per_block = seq_len - 1 - conv.first
    n_blocks = min(len(blocks), -(-num_positions // per_block))
    return random.Random(seed).sample(range(len(blocks)), n_blocks), blocks, len(blocks) * per_block, conv.first
