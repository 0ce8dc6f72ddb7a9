#!/usr/bin/env python
"""Look inside a model layer by layer.

    python analyze.py --prompt "The capital of France is" --lens runs/demo --out out/
        decodes every layer of the prompt's last position with the logit lens and the tuned lens,
        prints the top-1 token per layer and writes out/predictions.csv (one row per lens, layer,
        position, rank).

    python analyze.py --view representation --out out/ [--data prompts.txt] [--num-prompts 200]
        per-layer representation quality (Skean et al. 2024): representation_layers.csv,
        representation_prompts.csv and representation.png.

The depth-analysis views of the Guess-then-Refine paper (--view frequency|pos|facts|mcq|all) are
not implemented yet: asking for them exits with an error instead of pretending.
"""

from __future__ import annotations

import argparse

from lenses import LensesError, LogitLens, ModelAdapter, TunedLens, load_model
from lenses.cli import run_cli
from lenses.io import write_csv
from lenses.trace import layer_predictions

PLANNED_VIEWS = ("frequency", "pos", "facts", "mcq", "all")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder, cached hub id or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--lens", default="logit", help="'logit', or a tuned lens folder (then both lenses are shown)")
    p.add_argument("--prompt", default="The capital of France is", help="text to decode layer by layer")
    p.add_argument("--all-positions", action="store_true", help="every position, not just the last")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--view", choices=("representation", *PLANNED_VIEWS), default=None,
                   help="representation; frequency|pos|facts|mcq|all are not implemented yet")
    p.add_argument("--data", default=None, help="representation: prompts (.txt: one per line, or .jsonl 'text')")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64, help="representation: tokens per prompt")
    p.add_argument("--alpha", type=float, default=1.0, help="representation: Renyi order (1 = von Neumann)")
    p.add_argument("--drop-first-token", action="store_true",
                   help="representation: leave out position 0 (attention-sink token)")
    p.add_argument("--hist-layer", type=int, default=None, help="representation: layer of the entropy histogram")
    p.add_argument("--no-strict", action="store_true", help="accept a lens whose model weights differ slightly")
    p.add_argument("--out", default=None, help="folder for predictions.csv")
    a = p.parse_args(argv)
    if a.view in PLANNED_VIEWS:
        raise LensesError(f"--view {a.view} is not implemented yet; available: --prompt decoding and --view representation.")

    model, tok = load_model(a.model)
    adapter = ModelAdapter.from_model(model)
    if a.view == "representation":
        return representation(a, adapter, tok)
    lenses = {"logit": LogitLens(adapter)}
    if a.lens != "logit":
        lenses["tuned"] = TunedLens.from_pretrained(a.lens, model=adapter, strict=not a.no_strict)
    table = layer_predictions(adapter, tok, a.prompt, lenses, k=a.top_k, positions=None if a.all_positions else [-1])
    top1 = table[(table["rank"] == 1) & (table.position == table.position.max())]
    wide = top1.pivot(index="layer", columns="lens", values="token")
    print(f"top-1 prediction after {a.prompt!r}, by layer:")
    print(wide.map(repr).to_string())
    if a.out:
        path = write_csv(f"{a.out}/predictions.csv", table)
        print(f"wrote {path}")
    return 0


def representation(a, adapter, tok) -> int:
    from lenses.analysis.representation import representation_view
    from lenses.data import read_texts
    from lenses.plots import plot_representation

    if a.data and a.data.endswith(".txt"):
        prompts = [ln.strip() for ln in open(a.data, encoding="utf-8") if ln.strip()]
    else:
        paragraphs = [p for t in read_texts(a.data) for p in t.split("\n\n")]
        prompts = [p for p in paragraphs if len(p.split()) >= 30]
    if len(prompts) < 2:
        raise LensesError("the representation view needs at least 2 prompts of 30+ words; pass more text with --data.")
    prompts = prompts[: a.num_prompts]
    summary, per_prompt = representation_view(adapter, tok, prompts, alpha=a.alpha, max_tokens=a.max_tokens,
                                                 drop_first_token=a.drop_first_token)
    out = a.out or "out"
    write_csv(f"{out}/representation_layers.csv", summary)
    write_csv(f"{out}/representation_prompts.csv", per_prompt)
    plot_representation(summary, per_prompt, f"{out}/representation.png", a.hist_layer)
    wide = summary.pivot(index="layer", columns="metric", values="mean")
    print(f"per-layer means over {len(prompts)} prompts:")
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}/representation_layers.csv, representation_prompts.csv, representation.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
