#!/usr/bin/env python
"""Held-out per-layer KL of several lenses on several corpora: the cross-domain table of the README
and the lens card (does a lens trained on one kind of text transfer to another?).

    .venv/bin/python scripts/cross_domain.py --lens logit,smollm2-135m-instruct,runs/wiki-lens \
        --corpora wikipedia,books,pydocs --out out/cross_domain.csv

A corpus may be ``generated:N[:SOURCE]``: the model's own chat transcripts (`lenses.text.chat.generated_corpus`,
the ones `train_probes.py --corpus generated:N` trains on; their held-out split is that lens's held-out text).

Prints a Markdown table (KL in nats per token, selected layers and the mean over layers 0..L-1) and
writes the tidy CSV (with kl_low/kl_high: 95% bootstrap intervals resampling 256-token blocks).
"""

import argparse
import time

from lenses.base.io import write_csv
from lenses.kinds.registry import select_lenses
from lenses.model.loading import ModelOptions
from lenses.text.chat import generated_corpus, is_generated
from lenses.text.data import read_texts
from lenses.tracing.evaluate import cross_domain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lens", default="logit,smollm2-135m-instruct")
    p.add_argument("--corpora", default="wikipedia,books,pydocs")
    p.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens per corpus")
    p.add_argument("--layers", default="0,5,10,15,20,25,29")
    p.add_argument("--out", default="out/cross_domain.csv")
    p.add_argument("--no-logit", action="store_true", help="leave the logit lens out (a quarter less work with "
                   "three other lenses)")
    a = p.parse_args()
    model, tok, adapter = ModelOptions().load()
    lenses = select_lenses(a.lens, adapter)
    if a.no_logit:
        lenses.pop("logit")
    start = time.time()
    corpora = {c: generated_corpus(adapter, tok, c, progress=True) if is_generated(c) else read_texts(c)
               for c in a.corpora.split(",")}
    table = cross_domain(adapter, tok, lenses, corpora, max_tokens=a.max_tokens)
    print(f"evaluated in {time.time() - start:.0f} s; wrote {write_csv(a.out, table)}\n")
    layers = [int(x) for x in a.layers.split(",")]
    L = adapter.num_layers
    head = ["corpus", "lens", *(f"layer {x}" for x in layers), f"mean 0-{L - 1}"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for (corpus, lens), g in table.groupby(["corpus", "lens"], sort=False):
        g = g.set_index("layer").kl_nats
        cells = [f"{g[x]:.2f}" for x in layers] + [f"{g.loc[: L - 1].mean():.2f}"]
        print(f"| {corpus} | {lens} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
