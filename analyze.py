#!/usr/bin/env python
"""Look inside a model layer by layer.

    python analyze.py --view all --out out/
        the four depth-analysis views of Gupta et al. 2025 ("Guess-then-Refine") with the logit
        lens and the tuned lens: frequency, pos, facts, mcq. Each writes <view>_*.csv tables and
        <view>.png into --out and prints a short summary. One view: --view facts (etc.).

    python analyze.py --prompt "The capital of France is" --out out/
        decodes every layer of the prompt's last position with each lens, prints the top-1 token
        per layer and writes out/predictions.csv (one row per lens, layer, position, rank).

    python analyze.py --view representation --out out/ [--corpus prompts.txt] [--num-prompts 200]
        per-layer representation quality (Skean et al. 2024): representation_layers.csv,
        representation_prompts.csv and representation.png.

--lens: 'auto' (default: the logit lens plus the tuned lens shipped for this model, if any),
'logit', 'both' (logit + shipped tuned lens; error if none is shipped), or lens folders / shipped
names, comma-separated (each shown next to the logit lens). --out must be new, empty, or the
output folder of an earlier analyze.py run.
"""

from __future__ import annotations

import time

from lenses.analysis import DEPTH_VIEWS, VIEW_NAMES, AnalysisConfig, Context, run_view
from lenses.cli import Parser, add_options, from_args, run_cli
from lenses.io import write_csv
from lenses.outdir import claim
from lenses.registry import select_lenses

GROUPS = {"model": "model", "lens": "lenses", "runtime": "running", "prompt": "prompt decoding (without --view)",
          "views": "views"}


def parse_args(argv=None) -> tuple[AnalysisConfig, str | None]:
    p = Parser(description=__doc__, prog="analyze.py")
    p.add_argument("--view", choices=(*VIEW_NAMES, "all"), default=None,
                   help="which view to run; all = the four depth views (default: none, decode --prompt)")
    add_options(p, AnalysisConfig, GROUPS)
    a = p.parse_args(argv)
    return from_args(AnalysisConfig, a), a.view


def main(argv=None) -> int:
    cfg, view = parse_args(argv)
    with claim(cfg.out, "analysis"):
        model, tok, adapter = cfg.load()
        ctx = Context(adapter, tok, select_lenses(cfg.lens, adapter, strict=cfg.strict), cfg)
        if view is None:
            return decode_prompt(ctx)
        for name in DEPTH_VIEWS if view == "all" else (view,):
            start = time.time()
            result = run_view(name, ctx)
            written = result.write(cfg.out)
            print(f"\n== {name} ({time.time() - start:.0f} s)")
            print("\n".join(result.summary))
            print("wrote " + ", ".join(map(str, written)))
    return 0


def decode_prompt(ctx: Context) -> int:
    from lenses.trace import layer_predictions

    cfg = ctx.cfg
    table = layer_predictions(ctx.adapter, ctx.tokenizer, cfg.prompt, ctx.lenses, k=cfg.top_k,
                              positions=None if cfg.all_positions else [-1])
    top1 = table[(table["rank"] == 1) & (table.position == table.position.max())]
    wide = top1.pivot(index="layer", columns="lens", values="token")
    print(f"top-1 prediction after {cfg.prompt!r}, by layer:")
    print(wide.map(repr).to_string())
    print(f"wrote {write_csv(f'{cfg.out}/predictions.csv', table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
