#!/usr/bin/env python
"""Look inside a model layer by layer.

    python analyze.py --view all --out out/
        the four depth-analysis views of Gupta et al. 2025 ("Guess-then-Refine") with the logit
        lens and the tuned lens: frequency, pos, facts, mcq. Each writes <view>_*.csv tables and
        <view>.png into --out, prints a short summary, and writes --out/index.html, the page to open
        first (settings, summaries, figures, links to the tables). One view: --view facts (etc.).

    python analyze.py --prompt "The capital of France is" --out out/ [--html out/lens.html] [--png out/lens.png]
        decodes every layer and position of the prompt with each lens, prints the top-1 token per
        layer at the last position and writes out/lens_grid.csv (one row per lens, layer and
        position: top-k tokens and probabilities, entropy, KL to the final layer, rank of the true
        next token); --html writes the interactive grid page, --png the grid as a figure.

    python analyze.py --view representation --out out/ [--corpus prompts.txt] [--num-prompts 200]
        per-layer representation quality (Skean et al. 2024): representation_layers.csv,
        representation_prompts.csv and representation.png.

    python analyze.py --view causal --out out/
        causal checks of what the lenses show: early-exit (stop at layer l, emit the lens's
        prediction), patching (cross-task activation patching: the switch layer vs the lens's
        reading; --tasks, --num-pairs, --positions) and layer-skip (skip block l, measure every
        later readout and the output; --skip-mode zero|mean). One: --view patching (etc.).

    python analyze.py --view agreement --lens logit,tuned,jacobian:runs/jlens --out out/
        how alike the lenses are, layer by layer: top-1 agreement and symmetric KL of every pair.

--lens: 'auto' (default: the logit lens plus every lens shipped for this model: tuned, Jacobian),
'logit', 'both' (logit + shipped tuned lens), 'tuned' or 'jacobian' (the shipped lens of that
kind; an error if none is shipped), or lens folders, J-lens .pt files, shipped names or hub ids
(neuronpedia/jacobian-lens:gpt2-small), each optionally labelled (mine:runs/lens), comma-separated
(each shown next to the logit lens). --out must be new, empty, or the output folder of an earlier
analyze.py run.
"""

from __future__ import annotations

import time

from lenses.analysis import CAUSAL_VIEWS, DEPTH_VIEWS, VIEW_NAMES, AnalysisConfig, Context, run_view
from lenses.cli import Parser, add_options, from_args, run_cli
from lenses.io import write_csv
from lenses.models import DEFAULT_MODEL
from lenses.outdir import claim
from lenses.registry import select_lenses
from lenses.report import Report, ViewEntry, analysis_settings

GROUPS = {"model": "model", "lens": "lenses", "runtime": "running", "prompt": "prompt decoding (without --view)",
          "views": "views", "causal": "causal checks (early-exit, patching, layer-skip)"}


def parse_args(argv=None) -> tuple[AnalysisConfig, str | None]:
    p = Parser(description=__doc__, prog="analyze.py")
    p.add_argument("--view", choices=(*VIEW_NAMES, "all", "causal"), default=None,
                   help="which view to run; all = the four depth views, causal = early-exit, patching and "
                        "layer-skip (default: none, decode --prompt)")
    add_options(p, AnalysisConfig, GROUPS)
    a = p.parse_args(argv)
    cfg = from_args(AnalysisConfig, a)
    if a.view and (cfg.html or cfg.png):
        p.error("--html and --png draw the grid of --prompt; run them without --view (views write "
                "<out>/index.html and their own figures)")
    return cfg, a.view


def main(argv=None) -> int:
    cfg, view = parse_args(argv)
    with claim(cfg.out, "analysis"):
        model, tok, adapter = cfg.load()
        ctx = Context(adapter, tok, select_lenses(cfg.lens, adapter, strict=cfg.strict), cfg)
        if view is None:
            return decode_prompt(ctx)
        names = list({"all": DEPTH_VIEWS, "causal": CAUSAL_VIEWS}.get(view, (view,)))
        report = Report(f"lenses analysis: {cfg.model or DEFAULT_MODEL}", analysis_settings(cfg, ctx.lenses, names))
        for name in names:
            start = time.time()
            result = run_view(name, ctx)
            written = result.write(cfg.out)
            report.views.append(ViewEntry(name, result.summary, written, time.time() - start))
            index = report.write(cfg.out)  # after every view: an interrupted run still has its page
            print(f"\n== {name} ({time.time() - start:.0f} s)")
            print("\n".join(result.summary))
            print("wrote " + ", ".join(map(str, written)))
        print(f"\nopen {index} first: the settings, every view's summary, figure and tables")
    return 0


def decode_prompt(ctx: Context) -> int:
    from lenses.viz import lens_grid, plot_grid, visible, write_grid_html

    cfg = ctx.cfg
    table = lens_grid(ctx.adapter, ctx.tokenizer, cfg.prompt, ctx.lenses, top_k=cfg.top_k)
    last = table[table.position == table.position.max()]
    wide = last.pivot(index="layer", columns="lens", values="token_1")
    print(f"top-1 prediction after {cfg.prompt!r}, by layer:")
    print(wide.map(repr).to_string())
    if cfg.all_positions:
        for name, rows in table.groupby("lens", sort=False):
            grid = rows.pivot(index="layer", columns="position", values="token_1").map(visible)
            grid.columns = [visible(t) for t in rows.drop_duplicates("position").input_token]
            print(f"\n{name} lens, every position (columns: input tokens):\n{grid.to_string()}")
    print(f"wrote {write_csv(f'{cfg.out}/lens_grid.csv', table)}")
    title = f"{cfg.model or DEFAULT_MODEL}: {cfg.prompt[:80]}"
    if cfg.html:
        print(f"wrote {write_grid_html(table, cfg.html, title)} (open it in a browser)")
    if cfg.png:
        print(f"wrote {plot_grid(table, cfg.png, stat=cfg.color)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
