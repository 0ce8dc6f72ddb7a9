#!/usr/bin/env python
"""Look inside a model layer by layer.

    python analyze.py --view all --out out/
        the four depth-analysis views of Gupta et al. 2025 ("Guess-then-Refine") with the logit
        lens and the tuned lens: frequency, pos, facts, mcq. Each writes <view>_*.csv tables and
        <view>.png into --out and prints a short summary. One view: --view facts (etc.).

    python analyze.py --prompt "The capital of France is" --out out/
        decodes every layer of the prompt's last position with both lenses, prints the top-1 token
        per layer and writes out/predictions.csv (one row per lens, layer, position, rank).

    python analyze.py --view representation --out out/ [--data prompts.txt] [--num-prompts 200]
        per-layer representation quality (Skean et al. 2024): representation_layers.csv,
        representation_prompts.csv and representation.png.

--lens: 'auto' (default: the logit lens plus the tuned lens shipped for this model, if any),
'logit', 'both' (logit + shipped tuned lens; error if none is shipped), or a lens folder
(logit + that lens).
"""

from __future__ import annotations

import argparse
import time

from lenses import LensesError, LogitLens, ModelAdapter, TunedLens, load_model
from lenses.cli import run_cli
from lenses.io import write_csv

DEPTH_VIEWS = ("frequency", "pos", "facts", "mcq")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder, cached hub id or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--lens", default="auto", help="auto | logit | both | PATH of a tuned lens folder")
    p.add_argument("--view", choices=("representation", *DEPTH_VIEWS, "all"), default=None)
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over the available devices")
    p.add_argument("--layers", default=None, help="dotted path of the decoder layers, if not found (e.g. model.layers)")
    p.add_argument("--final-norm", default=None, help="dotted path of the final norm, if not found (e.g. model.norm)")
    p.add_argument("--unembed", default=None, help="dotted path of the unembedding, if not found (e.g. lm_head)")
    p.add_argument("--model-dtype", default=None, help="float32 (default on CPU), bfloat16 or float16")
    p.add_argument("--no-strict", action="store_true", help="accept a lens whose model weights differ slightly")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("prompt decoding")
    g.add_argument("--prompt", default="The capital of France is", help="text to decode layer by layer")
    g.add_argument("--all-positions", action="store_true", help="every position, not just the last")
    g.add_argument("--top-k", type=int, default=1)
    g = p.add_argument_group("depth views")
    g.add_argument("--data", default=None, help="text corpus for frequency/pos/representation (default: Python docs prose)")
    g.add_argument("--facts", default=None, help="facts JSONL: {prompt, answer}, CounterFact or MQuAKE (default: shipped set)")
    g.add_argument("--mcq", default=None, help="MMLU-layout CSV: question,A,B,C,D,answer (default: shipped set)")
    g.add_argument("--frequencies", default=None, help="token_frequencies.safetensors (default: counted on --data)")
    g.add_argument("--num-positions", type=int, default=1000, help="frequency: positions traced")
    g.add_argument("--num-texts", type=int, default=200, help="pos: paragraphs tagged")
    g.add_argument("--num-facts", type=int, default=None, help="facts: sample this many (default: all)")
    g.add_argument("--num-questions", type=int, default=100, help="mcq: questions scored")
    g = p.add_argument_group("representation view")
    g.add_argument("--num-prompts", type=int, default=200)
    g.add_argument("--max-tokens", type=int, default=64, help="tokens per prompt")
    g.add_argument("--alpha", type=float, default=1.0, help="Renyi order (1 = von Neumann)")
    g.add_argument("--drop-first-token", action="store_true", help="leave out position 0 (attention-sink token)")
    g.add_argument("--hist-layer", type=int, default=None, help="layer of the entropy histogram")
    return p.parse_args(argv)


def build_lenses(choice: str, adapter: ModelAdapter, strict: bool = True) -> dict:
    """name -> lens for the --lens choice (see the module docstring)."""
    from lenses.registry import find_for

    lenses = {"logit": LogitLens(adapter)}
    if choice == "logit":
        return lenses
    if choice in ("auto", "both"):
        name = find_for(adapter)
        if name is None:
            if choice == "both":
                raise LensesError("no tuned lens is shipped for this model: train one with "
                                  "`python train_probes.py --model ... --out DIR` and pass --lens DIR.")
            print("note: no shipped tuned lens matches this model; showing the logit lens only "
                  "(train one with train_probes.py and pass --lens DIR).")
            return lenses
        choice = name
    lenses["tuned"] = TunedLens.from_pretrained(choice, model=adapter, strict=strict)
    return lenses


def run_view(view: str, a, adapter, tok, lenses):
    """Run one depth view with the CLI's options; returns its `ViewResult`."""
    progress = not a.no_progress
    if view == "frequency":
        from lenses.analysis.frequency import frequency_view
        from lenses.data import read_texts
        from lenses.frequency import TokenFrequencies

        freqs = TokenFrequencies.load(a.frequencies) if a.frequencies else None
        return frequency_view(adapter, tok, lenses, read_texts(a.data), freqs, a.num_positions, seed=a.seed,
                              progress=progress)
    if view == "pos":
        from lenses.analysis.pos import pos_view
        from lenses.data import read_texts

        return pos_view(adapter, tok, lenses, read_texts(a.data), a.num_texts, seed=a.seed, progress=progress)
    if view == "facts":
        from lenses.analysis.facts import facts_view, read_facts

        return facts_view(adapter, tok, lenses, read_facts(a.facts), a.num_facts, seed=a.seed, progress=progress)
    if view == "mcq":
        from lenses.analysis.mcq import mcq_view, read_mcq

        return mcq_view(adapter, tok, lenses, read_mcq(a.mcq), a.num_questions, seed=a.seed, progress=progress)
    raise ValueError(view)


def plot_view(result, out: str) -> str:
    from lenses import plots

    t = result.tables
    path = f"{out}/{result.view}.png"
    if result.view == "frequency":
        plots.plot_frequency(t["layers"], path)
    elif result.view == "pos":
        plots.plot_pos(t["tags"], t["onset"], path)
    elif result.view == "facts":
        plots.plot_facts(t["by_index"], t["onset"], path)
    elif result.view == "mcq":
        plots.plot_mcq(t["layers"], t["questions"], path)
    return path


def main(argv=None) -> int:
    a = parse_args(argv)
    from lenses.io import ensure_writable

    ensure_writable(a.out)
    model, tok = load_model(a.model, device=a.device, dtype=a.model_dtype, device_map=a.device_map)
    adapter = ModelAdapter.from_model(model, layers=a.layers, final_norm=a.final_norm, unembed=a.unembed)
    if a.view == "representation":
        return representation(a, adapter, tok)
    lenses = build_lenses(a.lens, adapter, strict=not a.no_strict)
    if a.view is None:
        return decode_prompt(a, adapter, tok, lenses)
    for view in DEPTH_VIEWS if a.view == "all" else (a.view,):
        start = time.time()
        result = run_view(view, a, adapter, tok, lenses)
        written = [str(write_csv(f"{a.out}/{view}_{name}.csv", table)) for name, table in result.tables.items()]
        written.append(plot_view(result, a.out))
        print(f"\n== {view} ({time.time() - start:.0f} s)")
        print("\n".join(result.summary))
        print("wrote " + ", ".join(written))
    return 0


def decode_prompt(a, adapter, tok, lenses) -> int:
    from lenses.trace import layer_predictions

    table = layer_predictions(adapter, tok, a.prompt, lenses, k=a.top_k, positions=None if a.all_positions else [-1])
    top1 = table[(table["rank"] == 1) & (table.position == table.position.max())]
    wide = top1.pivot(index="layer", columns="lens", values="token")
    print(f"top-1 prediction after {a.prompt!r}, by layer:")
    print(wide.map(repr).to_string())
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
    write_csv(f"{a.out}/representation_layers.csv", summary)
    write_csv(f"{a.out}/representation_prompts.csv", per_prompt)
    plot_representation(summary, per_prompt, f"{a.out}/representation.png", a.hist_layer)
    wide = summary.pivot(index="layer", columns="metric", values="mean")
    print(f"per-layer means over {len(prompts)} prompts:")
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {a.out}/representation_layers.csv, representation_prompts.csv, representation.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
