"""Lenses move between us and the tuned-lens package (0.2.0), checked against the package's own code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from lenses import TunedLens
from lenses.kinds.load import export_tuned_lens

FIXTURES = Path(__file__).parent / "fixtures"
has_tuned_lens = importlib.util.find_spec("tuned_lens") is not None


@pytest.fixture(autouse=True)
def tuned_lens_without_transformer_lens(monkeypatch):
    """tuned-lens 0.2 checks `transformer_lens.HookedTransformer` whenever TransformerLens is installed, and
    TransformerLens 4 (our `tl` test extra) removed that class: tell tuned-lens it is absent."""
    if has_tuned_lens:
        import tuned_lens.model_surgery as surgery

        monkeypatch.setattr(surgery, "_transformer_lens_available", False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lens_saved_by_tuned_lens_gives_its_logits(family):
    """Fixture written by tuned-lens's own TunedLens.save (see fixtures/make_tuned_lens_fixture.py)."""
    folder = FIXTURES / f"tuned_lens_{family}"
    expected = torch.load(folder / "expected.pt", weights_only=True)
    lens = TunedLens.from_pretrained(folder, model=tiny_model(family))
    assert lens.config.get("imported_from") == "tuned-lens"
    for layer in range(lens.num_layers):
        with torch.no_grad():
            got = lens(expected["hidden"], layer)
        torch.testing.assert_close(got, expected["logits"][layer], rtol=1e-5, atol=1e-5)


def _package_lens(model, seed=3):
    from tuned_lens import TunedLens as PackageLens

    lens = PackageLens.from_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lens:
            t.weight.normal_(0, 0.05, generator=g)
            t.bias.normal_(0, 0.05, generator=g)
    return lens


@pytest.mark.skipif(not has_tuned_lens, reason="tuned-lens is not installed (pip install --no-deps tuned-lens==0.2.0)")
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_live_round_trip_with_the_package(tmp_path, family):
    from tuned_lens import TunedLens as PackageLens
    from tuned_lens.nn import Unembed

    model = tiny_model(family)
    h = torch.randn(6, model.config.hidden_size)
    theirs = _package_lens(model)
    theirs.save(tmp_path / "theirs")
    ours = TunedLens.from_pretrained(tmp_path / "theirs", model=model)
    export_tuned_lens(ours, tmp_path / "ours")
    back = PackageLens.from_unembed_and_pretrained(Unembed(model), str(tmp_path / "ours"))
    with torch.no_grad():
        for layer in range(ours.num_layers):
            ref = theirs(h, layer)
            torch.testing.assert_close(ours(h, layer), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(back(h, layer), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("nnsight") is None, reason="nnsight is not installed")
def test_readme_nnsight_example_matches_our_hidden_states():
    """The README's recipe: the input of block l (nnsight) is our layer l; the final norm's input is layer L."""
    from nnsight import NNsight

    from lenses import LogitLens, ModelAdapter

    model = tiny_model("llama")
    ids = torch.tensor([[5, 9, 2, 7, 1, 3]])
    wrapped = NNsight(model)
    with wrapped.trace(ids):
        h1 = wrapped.model.layers[1].input.save()
        h_last = wrapped.model.norm.input.save()
    adapter = ModelAdapter.from_model(model)
    ours = adapter.hidden_states(ids)
    torch.testing.assert_close(h1, ours[1])
    torch.testing.assert_close(h_last, ours[adapter.num_layers])
    lens = TunedLens.for_model(adapter)
    with torch.no_grad():
        torch.testing.assert_close(lens(h_last, adapter.num_layers), model(input_ids=ids).logits)
        torch.testing.assert_close(LogitLens(adapter)(h1, 1), lens(h1, 1))
