"""The views that act on the model (interventions, fidelity, intermediates, patchscope) through the CLI on a tiny
model, their identities, their refusals (one line, exit 2), and on the default model the swap identity at the
last layer."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tiny_models import random_lens, run_analyze, tiny_inputs

from lenses import ModelAdapter


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tiny_inputs(tmp_path_factory.mktemp("acting") / "in")
    adapter = ModelAdapter.from_model(AutoModelForCausalLM.from_pretrained(root / "model"))
    random_lens(adapter, scale=0.2).save_pretrained(root / "tuned")
    item = {"prompt": "The quick brown fox", "answer": "jumps", "intermediates": ["fox", "dog"]}
    (root / "items.jsonl").write_text(json.dumps(item) + "\n" + json.dumps({**item, "prompt": "A lazy dog"}) + "\n")
    return root


def _args(root, view, *extra):
    return ["--model", root / "model", "--corpus", root / "corpus.txt", "--lens", f"logit,tuned:{root / 'tuned'}",
            "--view", view, *extra]


@pytest.mark.slow
@pytest.mark.ci
def test_acting_views_write_their_tables_and_identities(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_analyze(_args(inputs, "acting", "--act-layers", "3", "--facts", inputs / "facts.jsonl", "--items",
                          inputs / "items.jsonl", "--out", out), capsys)
    assert r.returncode == 0, r.stderr
    effects = pd.read_csv(out / "fidelity_effects.csv")
    last = effects[(effects.layer == effects.layer.max()) & (effects.metric == "alignment")]
    # at the last layer every lens reads the model's own output: the stimulus is the response
    assert len(last) == 4 and (last.value > 1 - 1e-4).all()
    inter = pd.read_csv(out / "interventions_effects.csv")
    assert set(inter.condition) == {"ablate", "ablate-random", "steer", "steer-random"}
    drop = inter[(inter.metric == "logprob_drop") & (inter.layer == inter.layer.max())]
    ablated, control = (drop[drop.condition == c].value.to_numpy() for c in ("ablate", "ablate-random"))
    assert (ablated > control).all()
    passk = pd.read_csv(out / "intermediates_passk.csv")
    assert passk.n.max() == 2 and set(passk.condition) == {"intermediate", "answer"}
    assert "data: 2 of 2 items" in r.stdout
    r = run_analyze(_args(inputs, "patchscope", "--out", out, "--overwrite"), capsys)
    assert r.returncode == 0, r.stderr
    tokens = pd.read_csv(out / "patchscope_tokens.csv")
    assert tokens.layer.nunique() == 4


@pytest.mark.parametrize("extra, message", [
    (("--view", "interventions", "--steer-token", "fox"), "'fox' is 3 tokens for this tokenizer (['f', 'o', 'x'])"),
    (("--view", "interventions", "--steer-alpha", "nan"), "not a finite number"),
    (("--view", "intermediates", "--items", "MISSING"), "items file MISSING does not exist"),
    (("--view", "fidelity", "--fidelity-k", "40"), "--fidelity-k 40 asks for more directions than the model's 32"),
    (("--view", "interventions", "--steer-token", ""), "'' is 0 tokens for this tokenizer"),
])
def test_bad_input_is_one_line_and_status_2(inputs, tmp_path, capsys, extra, message):
    argv = ["--model", inputs / "model", "--corpus", inputs / "corpus.txt", "--lens", "logit", "--out", tmp_path / "o",
            *extra]
    r = run_analyze(argv, capsys)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_an_items_line_without_a_field_is_named(inputs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b", "intermediates": ["c"]}\n{"prompt": "a", "answer": "b"}\n')
    r = run_analyze(["--model", inputs / "model", "--lens", "logit", "--view", "intermediates", "--items", bad,
                     "--out", tmp_path / "o"], capsys)
    assert r.returncode == 2 and f"{bad}:2: missing or empty intermediates" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.ci
def test_swap_at_the_last_layer_moves_the_default_models_answer(smollm2):
    """On SmolLM2 with the shipped lenses: at the last layer every lens reads the model's output, so the edit that
    makes the lens read another answer where it read this one must move the model's top-1 to it (>= 95% of
    prompts); the control (the same step along a random direction) far less often."""
    from lenses import load_lens
    from lenses.analysis.fidelity import swap_prompts
    from lenses.causal.swap import swap_trial
    from lenses.tracing.facts_data import read_facts

    model, tokenizer = smollm2
    adapter = ModelAdapter.from_model(model)
    prompts, tried = swap_prompts(adapter, tokenizer, read_facts(), 10, False, None)
    assert len(prompts) == 10
    L = adapter.num_layers
    for kind in ("smollm2-135m-instruct", "smollm2-135m-instruct-jacobian"):
        lens = load_lens(kind, model=adapter)
        trials = [swap_trial(adapter, lens, p, L, seed=i) for i, p in enumerate(prompts)]
        success = sum(t["swap"] for t in trials) / len(trials)
        control = sum(t["control"] for t in trials) / len(trials)
        assert success >= 0.95 and control <= 0.3, (kind, success, control)


@pytest.mark.slow
def test_acting_views_run_on_the_default_model_with_all_three_shipped_lenses(tmp_path, capsys):
    out = tmp_path / "out"
    r = run_analyze(["--view", "acting", "--lens", "logit,tuned,jacobian", "--act-layers", "2", "--act-positions",
                     "32", "--num-swaps", "3", "--num-items", "4", "--fidelity-k", "1", "--out", out], capsys)
    assert r.returncode == 0, r.stderr
    for view, table in (("interventions", "effects"), ("fidelity", "effects"), ("intermediates", "passk")):
        t = pd.read_csv(out / f"{view}_{table}.csv")
        assert set(t.lens) == {"logit", "tuned", "jacobian"}, view
    swap = pd.read_csv(out / "fidelity_effects.csv").query("metric == 'success' and condition == 'swap'")
    assert (swap[swap.layer == swap.layer.max()].value == 1).all()  # the identity at the last layer
