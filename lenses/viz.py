"""The layer-by-position picture: one row per layer, one column per input position, each cell a
lens's top-1 token coloured by a statistic.

- `lens_grid` computes the tidy table behind it (one row per lens, layer and position) with
  `lenses.trace.trace`: one forward pass, decoded chunk by chunk.
- `grid_html` turns that table into one self-contained HTML page (inline script and style, no
  network): a switch between lenses and between colour statistics, the input tokens along the
  top, the top-k of a cell on hover or click. Tokens are inserted as text, never as markup.
- `plot_grid` draws the same table as a static figure, one panel per lens.

Both pictures are drawn from the table alone, so ``lens_grid.csv`` re-plots without the model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import convention, door
from .errors import LensesError
from .io import signature, write_text
from .outdir import check_target
from .plots import _pyplot, _save
from .models import ModelAdapter
from .trace import TraceItem, decode_chunk, trace

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
    given, e.g. a chat turn and its generated answer, `lenses.chat`).

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


def _check_table(table: pd.DataFrame) -> None:
    need = {"lens", "layer", "position", "input_token", "token_1", "prob_1", "entropy", "kl", "rank_next"}
    missing = need - set(table.columns)
    if missing:
        raise LensesError(f"the grid table lacks columns {sorted(missing)}: make it with lenses.viz.lens_grid "
                          "(or read a lens_grid.csv written by analyze.py --prompt).")
    if table.empty:
        raise LensesError("the grid table is empty: nothing to draw.")


# --------------------------------------------------------------------------- HTML page


def _layer_key(x) -> int | float:
    """A layer as the page names it: 3, or 3.5 for the half layer inside block 3 (`lens_grid(sublayers=True)`);
    JavaScript prints both as Python's json does, so they index the cells."""
    x = float(x)
    return int(x) if x.is_integer() else x


def grid_data(table: pd.DataFrame) -> dict:
    """The page's data: per lens, per layer, per position the cell's tokens, probabilities and statistics.
    Token strings go into one list referenced by index, so a long prompt stays a few MB."""
    _check_table(table)
    k = top_k_of(table)
    strings: dict[str, int] = {}

    def ref(s: str) -> int:
        return strings.setdefault(s, len(strings))

    table = table.sort_values(["lens", "layer", "position"], kind="stable")
    positions = sorted(table.position.unique())
    first = table[table.lens == table.lens.iloc[0]].drop_duplicates("position").set_index("position")
    data = {"inputs": [ref(str(first.input_token[p])) for p in positions],
            "next": [ref(str(first.next_token[p])) if "next_token" in first else ref("") for p in positions],
            "positions": [int(p) for p in positions], "layers": sorted(_layer_key(x) for x in table.layer.unique()),
            "roles": [str(first.role[p]) if "role" in first else "text" for p in positions],
            "k": k, "lenses": {}, "stats": {s: label for s, (_, label) in STATS.items()}}

    def num(v, digits=4):
        v = float(v)
        return None if math.isnan(v) else round(v, digits)

    for lens, rows in table.groupby("lens", sort=False):
        cells = {}
        for layer, lr in rows.groupby("layer"):
            lr = lr.set_index("position").reindex(positions)
            toks = [[ref(str(t)) for t in lr[f"token_{r}"].to_numpy()] for r in range(1, k + 1)]
            probs = [[num(v) for v in lr[f"prob_{r}"].to_numpy()] for r in range(1, k + 1)]
            cells[_layer_key(layer)] = {"tok": [list(x) for x in zip(*toks)], "p": [list(x) for x in zip(*probs)],
                                 **{s: [num(v) for v in lr[col].to_numpy()] for s, (col, _) in STATS.items()}}
        data["lenses"][str(lens)] = cells
    data["strings"] = list(strings)
    return data


def _script_json(obj) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' survive, so no '</script>' can end the block."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def grid_html(table: pd.DataFrame, title: str = "lens grid") -> str:
    """A self-contained page (no network) showing the grid of every lens in ``table``."""
    import html

    return (_PAGE.replace("__TITLE__", html.escape(title)).replace("__SIGNATURE__", signature())
            .replace("__DATA__", _script_json(grid_data(table))))


def write_grid_html(table: pd.DataFrame, path: str | os.PathLike, title: str = "lens grid",
                    overwrite: bool = False) -> Path:
    """The grid page (`grid_html`) written to ``path``; a file lenses did not write, or another run's, is
    refused unless ``overwrite`` (`lenses.outdir.check_target`)."""
    return write_text(check_target(path, overwrite, "the page"), grid_html(table, title))


# --------------------------------------------------------------------------- static figure


def plot_grid(table: pd.DataFrame, path: str | os.PathLike, stat: str = "top1_prob", lenses=None,
              max_positions: int = 24, overwrite: bool = False) -> Path:
    """The grid as a figure (one panel per lens, side by side), coloured by ``stat``; prompts longer
    than ``max_positions`` show their last ``max_positions`` positions (the title says so). A file lenses
    did not write, or another run's, is refused unless ``overwrite``."""
    from matplotlib.colors import LogNorm, Normalize

    check_target(path, overwrite, "the figure")
    _check_table(table)
    if stat not in STATS:
        raise LensesError(f"unknown colour statistic {stat!r}; choose one of {', '.join(STATS)}.")
    names = list(lenses) if lenses else list(dict.fromkeys(table.lens))
    unknown = [n for n in names if n not in set(table.lens)]
    if unknown:
        raise LensesError(f"the table has no lens {unknown[0]!r}; it has {', '.join(dict.fromkeys(table.lens))}.")
    positions = sorted(table.position.unique())
    shown = positions[-max_positions:]
    layers = sorted(table.layer.unique())
    plt = _pyplot()
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
    return _save(fig, path, overwrite)


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="__SIGNATURE__"><title>__TITLE__</title>
<style>
body{font:13px/1.4 system-ui,sans-serif;margin:12px;color:#222}
h1{font-size:16px;margin:0 0 8px}
#controls{margin:6px 0 10px;display:flex;gap:18px;flex-wrap:wrap;align-items:center}
#controls label{margin-right:8px;cursor:pointer}
#wrap{overflow:auto;max-height:80vh;border:1px solid #ccc}
table{border-collapse:collapse;font:12px ui-monospace,monospace}
td,th{border:1px solid #e3e3e3;padding:2px 4px;min-width:4.2em;max-width:7em;white-space:pre;overflow:hidden;
 text-overflow:ellipsis;text-align:center}
thead th{position:sticky;top:0;background:#f4f4f4;z-index:2}
th.layer{position:sticky;left:0;background:#f4f4f4;z-index:1;min-width:2.5em}
thead th.layer{z-index:3}
tr.next th{background:#fafafa;color:#666;font-weight:normal}
td.cell{cursor:pointer}
td.none{background:#fff;color:#bbb}
#tip{position:fixed;display:none;background:#fff;border:1px solid #888;box-shadow:0 2px 8px #0003;padding:6px 8px;
 font:12px ui-monospace,monospace;z-index:10;pointer-events:none}
#tip table td{border:none;text-align:left;min-width:0;max-width:none;padding:0 6px 0 0}
#legend{display:flex;align-items:center;gap:6px}
#bar{width:160px;height:10px;border:1px solid #ccc}
thead th.role-template{color:#999;font-weight:normal}
thead th.role-generated{background:#e8f4e8;border-bottom:3px solid #2a2}
.note{color:#666}
</style></head><body>
<h1>__TITLE__</h1>
<div id="controls">
 <div id="lenses"><b>lens</b> </div>
 <div id="stats"><b>colour</b> </div>
 <div id="legend"><span id="lo"></span><div id="bar"></div><span id="hi"></span></div>
</div>
<div class="note">rows: layers (0 = embeddings, last = the model's output); columns: input positions.
Each cell shows the lens's top-1 next-token guess; hover or click a cell for its top-k. Column heads in grey:
a chat template's markup; in green: tokens the model generated.
␣ space, ↵ newline, ⇥ tab.</div>
<div id="wrap"><table id="grid"></table></div>
<div id="tip"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const S = D.strings;
const lensNames = Object.keys(D.lenses);
let lens = lensNames[0], stat = "top1_prob", pinned = null;
function vis(t){ return (t.replace(/ /g,"\u2423").replace(/\n/g,"\u21b5").replace(/\r/g,"\u240d")
  .replace(/\t/g,"\u21e5").replace(/[\u0000-\u001f\u007f-\u009f]/g,
  c => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"))) || "\u2205"; }
function el(tag, text, cls){ const e = document.createElement(tag); if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls; return e; }
function radio(box, name, value, label, checked, onchange){
  const l = el("label"); const r = el("input"); r.type = "radio"; r.name = name; r.value = value;
  r.id = name + "-" + value;
  r.checked = checked; r.addEventListener("change", () => onchange(value)); l.appendChild(r);
  l.appendChild(document.createTextNode(" " + label)); box.appendChild(l); }
lensNames.forEach((n, i) => radio(document.getElementById("lenses"), "lens", n, n, i === 0,
  v => { lens = v; paint(); }));
Object.keys(D.stats).forEach(s => radio(document.getElementById("stats"), "stat", s, D.stats[s], s === stat,
  v => { stat = v; paint(); }));
// scale: value -> [0, 1] intensity over all lenses (so switching lens keeps the scale); probability 0..1,
// entropy and KL min..max, rank on a log scale with rank 1 darkest
function range(){ let lo = Infinity, hi = -Infinity;
  for (const n of lensNames) for (const l of D.layers) for (const v of D.lenses[n][l][stat])
    if (v !== null){ if (v < lo) lo = v; if (v > hi) hi = v; }
  if (stat === "top1_prob") return [0, 1];
  if (stat === "rank_next") return [1, Math.max(hi, 2)];
  return lo < hi ? [lo, hi] : [lo, lo + 1e-9]; }
function intensity(v, r){ if (v === null) return null;
  if (stat === "rank_next") return 1 - Math.log(v) / Math.log(r[1]);
  return Math.min(1, Math.max(0, (v - r[0]) / (r[1] - r[0]))); }
const HUE = {top1_prob: [33, 102, 172], entropy: [217, 95, 2], kl: [203, 24, 29], rank_next: [35, 139, 69]};
function colour(t){ const c = HUE[stat]; const m = x => Math.round(255 + (x - 255) * t);
  return "rgb(" + m(c[0]) + "," + m(c[1]) + "," + m(c[2]) + ")"; }
// build the table once: header of input tokens, one row per layer, a footer row of true next tokens
const grid = document.getElementById("grid");
const head = el("thead"); const hr = el("tr"); hr.appendChild(el("th", "layer", "layer"));
D.positions.forEach((p, j) => { const r = D.roles[j]; const th = el("th", vis(S[D.inputs[j]]), "role-" + r);
  th.title = "position " + p + (r === "text" ? "" : " (" + r + ")"); hr.appendChild(th); });
head.appendChild(hr); grid.appendChild(head);
const body = el("tbody"); const cells = [];
D.layers.forEach(l => { const tr = el("tr"); tr.appendChild(el("th", String(l), "layer"));
  const row = []; D.positions.forEach((p, j) => { const td = el("td", "", "cell");
    td.dataset.layer = l; td.dataset.pos = j;
    td.addEventListener("mouseenter", ev => { if (!pinned) show(td, ev); });
    td.addEventListener("mouseleave", () => { if (!pinned) hide(); });
    td.addEventListener("click", ev => { pinned = pinned === td ? null : td; if (pinned) show(td, ev); else hide(); });
    tr.appendChild(td); row.push(td); }); body.appendChild(tr); cells.push(row); });
const nr = el("tr", undefined, "next"); nr.appendChild(el("th", "next", "layer"));
D.positions.forEach((p, j) => nr.appendChild(el("th", vis(S[D.next[j]]))));
body.appendChild(nr); grid.appendChild(body);
function paint(){
  const r = range();
  const f = v => stat === "rank_next" ? "rank " + Math.round(v) : (+v).toFixed(stat === "top1_prob" ? 1 : 3);
  document.getElementById("lo").textContent = f(stat === "rank_next" ? r[1] : r[0]);
  document.getElementById("hi").textContent = f(stat === "rank_next" ? r[0] : r[1]);
  document.getElementById("bar").style.background = "linear-gradient(to right," + colour(0) + "," + colour(1) + ")";
  D.layers.forEach((l, i) => { const c = D.lenses[lens][l];
    D.positions.forEach((p, j) => { const td = cells[i][j]; const t = intensity(c[stat][j], r);
      td.textContent = c.p[j][0] === null ? "\u00b7" : vis(S[c.tok[j][0]]);
      td.title = c.p[j][0] === null ? "this lens does not read this layer" : "";
      td.className = t === null ? "cell none" : "cell";
      td.style.background = t === null ? "" : colour(t);
      td.style.color = t !== null && t > 0.55 ? "#fff" : "#111";
      td.dataset.value = c[stat][j] === null ? "" : String(c[stat][j]); }); });
  if (pinned) show(pinned); }
const tip = document.getElementById("tip");
function show(td, ev){
  const l = +td.dataset.layer, j = +td.dataset.pos, c = D.lenses[lens][l];
  tip.replaceChildren(el("div", lens + " lens, layer " + l + ", position " + D.positions[j] + " (" +
    vis(S[D.inputs[j]]) + " \u2192 next " + vis(S[D.next[j]]) + ")"));
  const t = el("table");
  for (let r = 0; r < D.k; r++){ const tr = el("tr"); tr.appendChild(el("td", (r + 1) + "."));
    tr.appendChild(el("td", vis(S[c.tok[j][r]]))); const p = c.p[j][r];
    tr.appendChild(el("td", p === null ? "" : (100 * p).toFixed(1) + "%")); t.appendChild(tr); }
  tip.appendChild(t);
  const f = v => v === null ? "n/a" : (+v).toFixed(3);
  tip.appendChild(el("div", "entropy " + f(c.entropy[j]) + ", KL " + f(c.kl[j]) + ", next-token rank " +
    (c.rank_next[j] === null ? "n/a" : c.rank_next[j])));
  tip.style.display = "block";
  const box = td.getBoundingClientRect();
  tip.style.left = Math.min(box.right + 6, window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = Math.min(box.top, window.innerHeight - tip.offsetHeight - 8) + "px"; }
function hide(){ tip.style.display = "none"; }
paint();
</script></body></html>
"""
