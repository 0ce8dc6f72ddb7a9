"""The lens grid as an interactive page: one self-contained HTML file (no network), every layer and position
of every lens, with the top-k tokens on hover."""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

import pandas as pd

from lenses.base.io import signature, write_text
from lenses.base.outdir import check_target
from lenses.pages.grid import STATS, check_table, top_k_of


def _layer_key(x) -> int | float:
    """A layer as the page names it: 3, or 3.5 for the half layer inside block 3 (`lens_grid(sublayers=True)`);
    JavaScript prints both as Python's json does, so they index the cells."""
    x = float(x)
    return int(x) if x.is_integer() else x


def grid_data(table: pd.DataFrame) -> dict:
    """The page's data: per lens, per layer, per position the cell's tokens, probabilities and statistics.
    Token strings go into one list referenced by index, so a long prompt stays a few MB."""
    check_table(table)
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

    return (_PAGE.replace("__TITLE__", html.escape(title)).replace("__SIGNATURE__", signature())
            .replace("__DATA__", _script_json(grid_data(table))))


def write_grid_html(table: pd.DataFrame, path: str | os.PathLike, title: str = "lens grid",
                    overwrite: bool = False) -> Path:
    """The grid page (`grid_html`) written to ``path``; a file lenses did not write, or another run's, is
    refused unless ``overwrite`` (`lenses.base.outdir.check_target`)."""
    return write_text(check_target(path, overwrite, "the page"), grid_html(table, title))


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
