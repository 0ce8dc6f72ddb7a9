"""The layer-by-position picture: one row per layer, one column per input position, each cell a
lens's top-1 token coloured by a statistic.

- `lens_grid` computes the tidy table behind it (one row per lens, layer and position) with
  `lenses.tracing.trace.trace`: one forward pass, decoded chunk by chunk.
- `grid_html` turns that table into one self-contained HTML page (inline script and style, no
  network): a switch between lenses and between colour statistics, the input tokens along the
  top, the top-k of a cell on hover or click. Tokens are inserted as text, never as markup.
- `plot_grid` draws the same table as a static figure, one panel per lens.

Both pictures are drawn from the table alone, so ``lens_grid.csv`` re-plots without the model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lenses.base import door
from lenses.base.errors import LensesError
from lenses.base.outdir import check_target
from lenses.model.adapter import ModelAdapter
from lenses.pages.plots import pyplot, save_figure
from lenses.text import convention
from lenses.tracing.trace import TraceItem, decode_chunk, trace

# colour statistics: name -> (column of the table, label)
STATS = {
    "top1_prob": ("prob_1", "top-1 probability"),
    "entropy": ("entropy", "entropy (nats)"),
    "kl": ("kl", "KL to the final layer (nats)"),
    "rank_next": ("rank_next", "rank of the true next token"),
}


_VISIBLE = {" ": "␣", "\n": "↵", "\r": "␍", "\t": "⇥"}


def visible(token: str) -> str:
    """A token with whitespace made visible (space ␣, newline ↵, tab ⇥), other control characters as
    ``\\xNN``, and the empty token as ∅ (the page's script does the same)."""
    out = "".join(_VISIBLE.get(c, f"\\x{ord(c):02x}" if ord(c) < 32 or 127 <= ord(c) < 160 else c) for c in token)
    return out or "∅"


def lens_grid(adapter, tokenizer, text: str, lenses: dict, top_k: int = 5, chunk: int = 256,
              dtype: torch.dtype = torch.float32, progress: bool = False, ids: list[int] | None = None,
              roles: list[str] | None = None, sublayers: bool = False) -> pd.DataFrame:
    """The table behind the grid: one row per (lens, layer, position) of ``text`` (or of the token ``ids``
    given, e.g. a chat turn and its generated answer, `lenses.text.chat`).

    Columns: lens, layer, position, role (``text`` for raw text, ``special`` for the tokenizer's own prefix
    such as BOS, else each token's part of a chat turn: template, system, user, assistant, generated), generated
    (whether the model generated that token), input_id, input_token, next_id and next_token (the true next
    token; -1 and "" at the last position),
    token_r, id_r, prob_r for r = 1..``top_k``, entropy, kl (to the final layer's distribution, nats),
    rank_next and prob_next (NaN at the last position). ``sublayers`` adds the half layers ``l + 0.5``: the
    mid-block state ``hidden[l] + attn[l]`` (`ModelAdapter.residual_parts`), read with layer ``l``'s reading.
    """
    if not isinstance(adapter, ModelAdapter):
        raise door.fail("adapter", adapter, "a ModelAdapter (lenses.ModelAdapter.from_model(model))")
    first = 0
    if ids is None:  # as the model reads it in use: the tokenizer's prefix (BOS), then the text
        door.text("text", text)
        first = convention.of(tokenizer).first
        ids = convention.encode(tokenizer, text)
    ids = door.token_ids("ids", ids, adapter.vocab_size, dims=1).tolist()
    if len(ids) == first:
        raise LensesError(f"the prompt {text!r} has no tokens; give some text (--prompt).")
    if roles is not None and (not isinstance(roles, (list, tuple)) or not all(isinstance(r, str) for r in roles)):
        raise door.fail("roles", roles, "a list of strings, one role per token")
    roles = list(roles) if roles is not None else ["special"] * first + ["text"] * (len(ids) - first)
    if len(roles) != len(ids):
        raise LensesError(f"{len(roles)} roles for {len(ids)} tokens: give one role per token.")
    top_k = door.integer("top_k (--top-k)", top_k, 1, adapter.vocab_size)
    n = len(ids)
    next_ids = list(ids[1:]) + [ids[-1]]  # the last position has no next token: masked below
    item = TraceItem(ids, list(range(n)), {"next": next_ids})
    df = trace(adapter, lenses, [item], chunk=chunk, dtype=dtype, progress=progress, top_k=top_k)
    if sublayers:
        df = pd.concat([df, _half_layers(adapter, lenses, item, top_k, dtype)], ignore_index=True)
        df = df.sort_values(["lens", "layer", "position"], kind="stable").reset_index(drop=True)
    last = df.position == n - 1
    df.loc[last, ["rank_next", "prob_next"]] = np.nan
    decode = _decoder(tokenizer)
    role = np.asarray(roles, dtype=object)[df.position.to_numpy()]
    out = pd.DataFrame({"lens": df.lens, "layer": df.layer, "position": df.position, "role": role,
                        "generated": role == "generated",
                        "input_id": [ids[p] for p in df.position], "input_token": [decode(ids[p]) for p in df.position],
                        "next_id": np.where(last, -1, df.target_next),
                        "next_token": ["" if p == n - 1 else decode(ids[p + 1]) for p in df.position]})
    for r in range(1, top_k + 1):
        out[f"token_{r}"] = [decode(int(i)) for i in df[f"top{r}_id"]]
        out[f"id_{r}"] = df[f"top{r}_id"].to_numpy()
        out[f"prob_{r}"] = df[f"top{r}_prob"].to_numpy()
    for col in ("entropy", "kl", "rank_next", "prob_next"):
        out[col] = df[col].to_numpy()
    return out


def _half_layers(adapter, lenses: dict, item: TraceItem, top_k: int, dtype) -> pd.DataFrame:
    """The trace rows of the half layers ``l + 0.5`` (mid-block states, read with layer ``l``'s reading)."""
    ids = torch.tensor([list(item.ids)])
    with torch.no_grad():
        parts = adapter.residual_parts(ids, with_hidden=True)
    h = parts["hidden"][:, 0]
    stack = torch.cat([h[:-1] + parts["attn"][:, 0], h[-1:]])  # layer L stays: the teacher of every row
    targets = {"next": torch.tensor(list(item.targets["next"]), device=stack.device)}
    meta = np.stack([np.zeros(len(item.ids), dtype=int), np.arange(len(item.ids))], 1)
    rows = decode_chunk(adapter, lenses, stack, meta, targets, None, (), dtype, top_k, [0])
    rows = rows[rows.layer < adapter.num_layers].copy()
    rows["layer"] = rows.layer + 0.5
    return rows


def _decoder(tokenizer):
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i < 0:  # a layer the lens does not read (e.g. layer 0 of a Jacobian lens): no token
            return ""
        if i not in cache:
            cache[i] = tokenizer.decode([int(i)])
        return cache[i]

    return decode


def read_grid(path: str | os.PathLike) -> pd.DataFrame:
    """A ``lens_grid.csv`` back as the table (tokens such as "null", "NaN" or "" stay strings)."""
    table = pd.read_csv(path, keep_default_na=False, dtype={"lens": str})
    for col in table.columns:
        if col == "generated":
            table[col] = table[col].astype(str).str.lower() == "true"
        elif not (col.startswith("token_") or col in ("lens", "input_token", "next_token", "role")):
            table[col] = pd.to_numeric(table[col], errors="coerce")
    return table


def top_k_of(table: pd.DataFrame) -> int:
    return sum(1 for c in table.columns if c.startswith("token_"))


def check_table(table: pd.DataFrame) -> None:
    need = {"lens", "layer", "position", "input_token", "token_1", "prob_1", "entropy", "kl", "rank_next"}
    missing = need - set(table.columns)
    if missing:
        raise LensesError(f"the grid table lacks columns {sorted(missing)}: make it with lenses.pages.grid.lens_grid "
                          "(or read a lens_grid.csv written by analyze.py --prompt).")
    if table.empty:
        raise LensesError("the grid table is empty: nothing to draw.")


# --------------------------------------------------------------------------- static figure


def plot_grid(table: pd.DataFrame, path: str | os.PathLike, stat: str = "top1_prob", lenses=None,
              max_positions: int = 24, overwrite: bool = False) -> Path:
    """The grid as a figure (one panel per lens, side by side), coloured by ``stat``; prompts longer
    than ``max_positions`` show their last ``max_positions`` positions (the title says so). A file lenses
    did not write, or another run's, is refused unless ``overwrite``."""
    from matplotlib.colors import LogNorm, Normalize

    check_target(path, overwrite, "the figure")
    check_table(table)
    if stat not in STATS:
        raise LensesError(f"unknown colour statistic {stat!r}; choose one of {', '.join(STATS)}.")
    names = list(lenses) if lenses else list(dict.fromkeys(table.lens))
    unknown = [n for n in names if n not in set(table.lens)]
    if unknown:
        raise LensesError(f"the table has no lens {unknown[0]!r}; it has {', '.join(dict.fromkeys(table.lens))}.")
    positions = sorted(table.position.unique())
    shown = positions[-max_positions:]
    layers = sorted(table.layer.unique())
    plt = pyplot()
    width = 1.2 + 0.42 * len(shown)  # per panel: 24 positions fill a two-column paper figure
    height = 1.4 + 0.2 * len(layers)
    fig, axes = plt.subplots(1, len(names), figsize=(width * len(names), height), squeeze=False)
    column, label = STATS[stat]
    values = table[column].astype(float)
    norm = (LogNorm(1, max(2.0, float(np.nanmax(values)))) if stat == "rank_next"
            else Normalize(0, 1 if stat == "top1_prob" else max(1e-9, float(np.nanmax(values)))))
    cmap = plt.get_cmap("viridis_r" if stat == "rank_next" else "Blues" if stat == "top1_prob" else "Oranges")
    for ax, name in zip(axes[0], names):
        rows = table[(table.lens == name) & table.position.isin(shown)]
        grid = rows.pivot(index="layer", columns="position", values=column).reindex(index=layers, columns=shown)
        tokens = rows.pivot(index="layer", columns="position", values="token_1").reindex(index=layers, columns=shown)
        read = rows.pivot(index="layer", columns="position", values="prob_1").reindex(index=layers, columns=shown)
        image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap=cmap, norm=norm, origin="lower",
                          interpolation="nearest")
        size = 6.5 if len(shown) <= 24 else 5
        for i, layer in enumerate(layers):
            for j, pos in enumerate(shown):
                v = grid.iat[i, j]
                dark = not math.isnan(v) and norm(v) > 0.55
                unread = math.isnan(float(read.iat[i, j]))  # a layer this lens does not read
                shown_token = "·" if unread else visible(str(tokens.iat[i, j]))[:8]
                ax.text(j, i, shown_token, ha="center", va="center", fontsize=size,
                        color="white" if dark else "black")
        first = rows.drop_duplicates("position").set_index("position")
        inputs = first.input_token.reindex(shown)
        ax.set_xticks(range(len(shown)), [visible(str(t))[:10] for t in inputs], rotation=60, ha="right",
                      fontsize=7)
        if "role" in first:  # template markup in grey; a line where the model's own tokens start
            roles = first.role.reindex(shown).tolist()
            for tick, role in zip(ax.get_xticklabels(), roles):
                tick.set_color("#999" if role == "template" else "#1a7a1a" if role == "generated" else "black")
            if "generated" in roles:
                ax.axvline(roles.index("generated") - 0.5, color="#1a7a1a", lw=1.5)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
        ax.set_ylabel("layer")
        ax.set_title(f"{name} lens" + (f" (last {len(shown)} of {len(positions)} positions)"
                                       if len(shown) < len(positions) else ""), fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01).set_label(label, fontsize=7)
    return save_figure(fig, path, overwrite)
