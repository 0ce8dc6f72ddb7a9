#!/usr/bin/env python
"""Look inside a model layer by layer.

    python analyze.py --prompt "The capital of France is" --lens runs/demo --out out/
        decodes every layer of the prompt's last position with the logit lens and the tuned lens,
        prints the top-1 token per layer and writes out/predictions.csv (one row per lens, layer,
        position, rank).

The depth-analysis views of the Guess-then-Refine paper (--view frequency|pos|facts|mcq|all)
and representation quality (--view representation) are not implemented yet: asking for them
exits with an error instead of pretending.
"""

from __future__ import annotations

import argparse

from lenses import LensesError, LogitLens, ModelAdapter, TunedLens, load_model
from lenses.cli import run_cli
from lenses.io import write_csv
from lenses.trace import layer_predictions

PLANNED_VIEWS = ("frequency", "pos", "facts", "mcq", "representation", "all")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder, cached hub id or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--lens", default="logit", help="'logit', or a tuned lens folder (then both lenses are shown)")
    p.add_argument("--prompt", default="The capital of France is", help="text to decode layer by layer")
    p.add_argument("--all-positions", action="store_true", help="every position, not just the last")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--view", choices=PLANNED_VIEWS, default=None, help="(not implemented yet)")
    p.add_argument("--no-strict", action="store_true", help="accept a lens whose model weights differ slightly")
    p.add_argument("--out", default=None, help="folder for predictions.csv")
    a = p.parse_args(argv)
    if a.view is not None:
        raise LensesError(f"--view {a.view} is not implemented yet; only --prompt decoding is available in this version.")

    model, tok = load_model(a.model)
    adapter = ModelAdapter.from_model(model)
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


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
