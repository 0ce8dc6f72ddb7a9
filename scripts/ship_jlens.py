#!/usr/bin/env python
"""Copy a fitted Jacobian lens into the package (lenses/pretrained/<name>/) with its card.

    python scripts/ship_jlens.py runs/jlens-smollm2 --name smollm2-135m-instruct-jacobian

Evaluates the logit lens, the shipped tuned lens for the same model and the Jacobian lens on the
held-out Wikipedia documents (float32): per-layer KL(final || lens) and top-1 agreement with the
model's own top-1, written as eval.csv (tidy: layer, lens, kl_nats, top1_agreement). Copies the
lens (config.json, translators.safetensors: float16 matrices), convergence.csv, draws
docs/jlens_convergence.png and writes the card (README.md).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd
import torch

from lenses import JacobianLens, LogitLens, ModelAdapter, load_lens, load_model
from lenses.base.io import write_csv, write_text
from lenses.kinds.registry import PRETRAINED_DIR, find_for
from lenses.pages.plots import plot_convergence
from lenses.text.data import make_blocks, read_texts
from lenses.tracing.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a lenses fit --out folder")
    p.add_argument("--name", required=True, help="short registry name")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens of the evaluation")
    a = p.parse_args()
    run = Path(a.run)
    model, tok = load_model()
    adapter = ModelAdapter.from_model(model)
    jlens = load_lens(run, adapter)
    assert isinstance(jlens, JacobianLens)
    lenses = {"logit": LogitLens(adapter)}
    tuned = find_for(adapter, "tuned")
    if tuned:
        lenses["tuned"] = load_lens(tuned, adapter)
    lenses["jacobian"] = jlens
    texts = read_texts(jlens.config.get("corpus"))
    _, held = make_blocks(texts, tok, 256, max_eval_blocks=max(1, a.eval_tokens // 256))
    result = evaluate(adapter, lenses, held, tok, dtype=torch.float32)
    table = result.table()[["layer", "lens", "kl_nats"]]
    agree = []
    for name, top1 in result.top1.items():
        final = top1[-1]
        for layer in range(adapter.num_layers + 1):
            present = lenses[name].has_layer(layer)
            agree.append({"layer": layer, "lens": name,
                          "top1_agreement": float((top1[layer] == final).float().mean()) if present else float("nan")})
    table = pd.DataFrame(agree).merge(table, on=["layer", "lens"], how="left")[["layer", "lens", "kl_nats",
                                                                               "top1_agreement"]]
    wide = table.pivot(index="layer", columns="lens", values="kl_nats")[list(lenses)]
    agree_wide = table.pivot(index="layer", columns="lens", values="top1_agreement")[list(lenses)]
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    print(agree_wide.to_string(float_format=lambda v: f"{v:.2f}"))

    dest = PRETRAINED_DIR / a.name
    dest.mkdir(parents=True, exist_ok=True)
    jlens.config["heldout_kl_nats"] = [None if v != v else round(v, 5) for v in wide.jacobian.tolist()]
    jlens.save_pretrained(dest)
    conv = pd.read_csv(run / "convergence.csv")
    shutil.copy(run / "convergence.csv", dest / "convergence.csv")
    write_csv(dest / "eval.csv", table)
    plot_convergence(conv, ROOT / "docs" / "jlens_convergence.png")

    c = jlens.config
    checkpoints = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= len(conv)] + ([len(conv)] if len(conv) not in
                                                                                 (1, 2, 4, 8, 16, 32, 64, 128) else [])
    conv_rows = "\n".join(f"| {n} | {conv.rel_change.iloc[n - 1]:.2e} | {conv.dist_identity.iloc[n - 1]:.3f} |"
                          for n in checkpoints)
    kl_rows = "\n".join(
        f"| {layer} | " + " | ".join("—" if wide.loc[layer, n] != wide.loc[layer, n] else f"{wide.loc[layer, n]:.3f}"
                                     for n in lenses) + " | "
        + " | ".join("—" if agree_wide.loc[layer, n] != agree_wide.loc[layer, n] else f"{agree_wide.loc[layer, n]:.0%}"
                     for n in lenses) + " |"
        for layer in wide.index)
    names = " | ".join(lenses)
    card = f"""# Jacobian lens for SmolLM2-135M-Instruct

A Jacobian lens (Gurnee et al. 2026) fitted with `lenses fit` on
{c.get('n_prompts')} prompts of {c.get('seq_len')} tokens (BOS first) from the training side of the `{c.get('corpus')}`
corpus (lead sections of Wikipedia's vital articles, documents of 600+ characters), skipping the
first {c.get('skip_first')} positions as sources and targets; the reference estimator (targets summed,
sources averaged, prompts weighted equally), float32 accumulation, matrices stored in float16.
Fit wall time: {c.get('fit_seconds', 0) / 60:.0f} min on {c.get('machine') or 'a 2-core CPU'}.
Layers 1..{adapter.num_layers - 1} have a matrix;
layer 0 (the embeddings) is absent, as in the published lenses; layer {adapter.num_layers} is the model's output.
The same matrices in the published format: `{run.name}/jacobian_lens.pt` of the fit folder
(`JacobianLens.save_published`).

Convergence (`convergence.csv`, `docs/jlens_convergence.png`): the running mean's relative change
when prompt n is added (max over layers) and its mean distance from the identity.

| prompts n | relative change | ‖J − I‖ / √d |
|---|---|---|
{conv_rows}

Held-out Wikipedia ({held.numel():,} tokens): KL(final || lens) in nats per token, and the share of
positions where the lens's top-1 token is the model's own top-1 (`eval.csv`).

| layer | KL: {names} | top-1 agreement: {names} |
|---|{'---|' * len(lenses)}{'---|' * len(lenses)}
{kl_rows}
"""
    write_text(dest / "README.md", card)
    print(f"shipped to {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
