"""``lenses analyze --states``: hidden states captured by another engine (transformers' output_hidden_states,
nnsight 0.7) decoded with the model's head only; the tables equal the live trace's, and wrong files get one
line (`lenses.tracing.states`)."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from test_parallel_views import _same
from tiny_models import random_lens, run_analyze, tiny_inputs

from lenses import ModelAdapter
from lenses.analysis.facts import fact_items
from lenses.model.head import load_head
from lenses.model.loading import ModelOptions
from lenses.text import convention

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny model folder, a tuned lens for it, and the model itself (its states captured two ways)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tiny_inputs(tmp_path_factory.mktemp("states") / "in", letters=True)
    rows = [f'{{"prompt": "Fact {i} says the quick brown", "answer": "fox"}}' for i in range(5)]
    (root / "facts.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    random_lens(ModelAdapter.from_model(model), scale=0.2).save_pretrained(root / "tuned")
    return root, model, AutoTokenizer.from_pretrained(root / "model")


def _hf(model, ids: list[int]) -> dict:
    """transformers' own capture: every hidden state (the last after the final norm) and the logits."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return {"hidden_states": torch.stack(out.hidden_states)[:, 0].contiguous(), "input_ids": torch.tensor(ids),
            "logits": out.logits[0].contiguous()}


def _nnsight(model, ids: list[int]) -> dict:
    """nnsight 0.7's capture: each block's output (``layers[i].output``) and the logits, as a dictionary."""
    from nnsight import NNsight

    wrapped = NNsight(model)
    with wrapped.trace(torch.tensor([ids])):
        first = wrapped.model.layers[0].output.save()
        second = wrapped.model.layers[1].output.save()
        third = wrapped.model.layers[2].output.save()
        logits = wrapped.lm_head.output.save()
    assert len(wrapped.model.layers) == 3  # the tiny model's blocks, each saved above
    saved = {0: first, 1: second, 2: third, "logits": logits}
    return {**{k: (v[0] if isinstance(v, tuple) else v).detach() for k, v in saved.items()},
            "input_ids": torch.tensor(ids)}


def _analyze(root, out, capsys, *extra):
    return run_analyze(["--model", root / "model", "--lens", f"logit,tuned:{root / 'tuned'}", "--out", out,
                        "--no-progress", "--decode-dtype", "float32", *extra], capsys)


def test_the_head_alone_has_the_whole_models_fingerprint_and_decoding(inputs):
    root, model, _ = inputs
    _, _, head = load_head(ModelOptions(model=str(root / "model")), "cpu")
    whole = ModelAdapter.from_model(model)
    assert all(p.device.type == "meta" for p in head.layers.parameters())  # the blocks never loaded
    assert head.num_layers == whole.num_layers
    assert head.fingerprint()["weights"]["tensors"] == whole.fingerprint()["weights"]["tensors"]
    h = torch.randn(4, whole.d_model, dtype=torch.float64)
    from lenses.engine import decode

    torch.testing.assert_close(decode(head, h.float()), decode(whole, h.float()))


@pytest.mark.parametrize("engine", ["transformers", "nnsight"])
def test_grid_of_captured_states_equals_the_live_grid(inputs, tmp_path, capsys, engine):
    if engine == "nnsight" and importlib.util.find_spec("nnsight") is None:
        pytest.skip("nnsight is not installed")
    root, model, tok = inputs
    ids = convention.encode(tok, PROMPT)  # as the model reads it
    captured = (_hf if engine == "transformers" else _nnsight)(model, ids)
    if engine == "transformers":
        save_file(captured, tmp_path / "states.safetensors")
        path = tmp_path / "states.safetensors"
    else:
        torch.save(captured, tmp_path / "states.pt")
        path = tmp_path / "states.pt"
    live = _analyze(root, tmp_path / "live", capsys, "--prompt", PROMPT)
    read = _analyze(root, tmp_path / "read", capsys, "--prompt", PROMPT, "--states", path)
    assert live.returncode == 0 and read.returncode == 0, read.stderr[-2000:]
    said = "after the final norm" if engine == "transformers" else "block outputs, read as layers 1..3"
    assert said in read.stdout, read.stdout
    _same(pd.read_csv(tmp_path / "live" / "lens_grid.csv"), pd.read_csv(tmp_path / "read" / "lens_grid.csv"), engine)


def test_a_depth_view_of_captured_states_equals_the_live_view(inputs, tmp_path, capsys):
    root, model, tok = inputs
    import json

    facts = [json.loads(line) for line in (root / "facts.jsonl").read_text().splitlines()]
    items, _ = fact_items(tok, facts, False, None)
    tensors = {}
    for k, it in enumerate(items):
        tensors.update({f"{name}.{k}": t for name, t in _hf(model, list(it.ids)).items()})
    save_file(tensors, tmp_path / "facts.safetensors")
    args = ("--view", "facts", "--facts", root / "facts.jsonl", "--chat-template", "off")
    live = _analyze(root, tmp_path / "live", capsys, *args)
    read = _analyze(root, tmp_path / "read", capsys, *args, "--states", tmp_path / "facts.safetensors")
    assert live.returncode == 0 and read.returncode == 0, read.stderr[-2000:]
    tables = sorted(p.name for p in (tmp_path / "live").glob("facts_*.csv"))
    assert tables
    for name in tables:
        _same(pd.read_csv(tmp_path / "live" / name), pd.read_csv(tmp_path / "read" / name), name)


def _wrong(captured: dict, how: str, other_vocab: int) -> dict:
    c = dict(captured)
    if how == "layers":
        c["hidden_states"] = c["hidden_states"][:-2]
    elif how == "width":
        c["hidden_states"] = torch.cat([c["hidden_states"], c["hidden_states"][..., :3]], -1)
    elif how == "vocabulary":
        c["logits"] = torch.randn(c["logits"].shape[0], other_vocab)
    elif how == "shifted":  # layers 1..L and the last again: the embeddings are missing at the front
        c["hidden_states"] = torch.cat([c["hidden_states"][1:], c["hidden_states"][-1:]])
    elif how == "no logits":
        del c["logits"]
    return c


@pytest.mark.parametrize("how, says", [
    ("layers", "states per token, but the model has"), ("width", "wide, but the model's residual stream"),
    ("vocabulary", "logits over 300 tokens"), ("shifted", "the layers seem shifted"),
    ("no logits", "needs the logits the model gave")])
def test_a_wrong_states_file_is_one_line(inputs, tmp_path, capsys, how, says):
    root, model, tok = inputs
    ids = convention.encode(tok, PROMPT)
    save_file(_wrong(_hf(model, ids), how, 300), tmp_path / "bad.safetensors")
    r = _analyze(root, tmp_path / "o", capsys, "--states", tmp_path / "bad.safetensors")
    assert r.returncode == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_states_refuse_views_that_run_the_model(inputs, tmp_path, capsys):
    root, _, _ = inputs
    (tmp_path / "x.safetensors").touch()
    r = _analyze(root, tmp_path / "o", capsys, "--view", "layer-skip", "--states", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "--states decodes captured states without running the model" in r.stderr


def test_states_that_do_not_exist_are_refused_before_any_model_loads(inputs, tmp_path, capsys, monkeypatch):
    import lenses.commands.analyze as analyze

    root, _, _ = inputs
    monkeypatch.setattr(analyze, "load_head", lambda *a: pytest.fail("the model's head was loaded"))
    r = _analyze(root, tmp_path / "o", capsys, "--view", "facts", "--states", tmp_path / "none.safetensors")
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("name", ["bad.safetensors", "bad.pt"])
def test_a_states_file_that_is_not_one_is_one_line(inputs, tmp_path, capsys, name):
    root, _, _ = inputs
    (tmp_path / name).write_bytes(b"not tensors at all")
    r = _analyze(root, tmp_path / "o", capsys, "--view", "facts", "--facts", root / "facts.jsonl", "--states",
                 tmp_path / name)
    assert r.returncode == 2 and ("could not be read" in r.stderr or "not a readable" in r.stderr), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
