"""Publishing: a lens pushed to a folder standing in for the hub comes back with the same logits, in our
format, in tuned-lens 0.2's (read by that package) and as a J-lens file TransformerLens 4.3 reads; a push onto
another model's lens is refused unless asked."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import random_lens, tiny_adapter, tiny_model

from lenses import JacobianLens, LensesError, TunedLens, load_lens
from lenses.__main__ import main
from lenses.kinds.publish import LocalHub, card


@pytest.fixture(autouse=True)
def tuned_lens_without_transformer_lens(monkeypatch):
    """tuned-lens 0.2 looks for TransformerLens 3's HookedTransformer when TransformerLens is installed."""
    surgery = pytest.importorskip("tuned_lens.model_surgery")
    monkeypatch.setattr(surgery, "_transformer_lens_available", False)


def _lens(adapter, model_name="google/gemma-3-270m"):
    lens = random_lens(adapter)
    lens.config.update(model=model_name, input={"prefix": [2], "suffix": [], "prefix_text": "<bos>"},
                       heldout_kl_nats=[3.5, 2.25, 1.0], training={"corpus": "wikipedia", "seq_len": 256})
    return lens


def test_ours_round_trips_and_the_card_says_what_it_is(tmp_path):
    adapter = tiny_adapter("llama")
    lens = _lens(adapter)
    where = lens.push_to_hub("me/lenses", subfolder="gemma", hub=LocalHub(tmp_path))
    back = load_lens(where, adapter)
    h = torch.randn(5, adapter.d_model)
    for layer in range(lens.num_layers):
        torch.testing.assert_close(back(h, layer), lens(h, layer), rtol=0, atol=0)
    text = (tmp_path / "me/lenses/main/gemma/README.md").read_text()
    assert "base_model: google/gemma-3-270m" in text and "<bos> first" in text
    assert "| 1 | 2.250 |" in text and "Gemma Terms of Use" in text


def test_tuned_lens_format_loads_in_the_package(tmp_path):
    from tuned_lens import TunedLens as PackageLens

    model = tiny_model("gpt2")
    lens = _lens(tiny_adapter("gpt2"), "gpt2")
    where = lens.push_to_hub("me/lenses", subfolder="gpt2", format="tuned-lens", hub=LocalHub(tmp_path))
    theirs = PackageLens.from_model_and_pretrained(model, where)
    h = torch.randn(4, model.config.hidden_size)
    with torch.no_grad():
        for layer in range(lens.num_layers):
            torch.testing.assert_close(theirs(h, layer), lens(h, layer), rtol=1e-5, atol=1e-5)


def test_jacobian_lens_file_loads_in_transformer_lens(tmp_path):
    pytest.importorskip("transformer_lens", reason="transformer-lens==4.3.0 (the 'tl' extra) is not installed")
    from transformer_lens.tools.analysis.jacobian_lens import JacobianLens as TLJacobianLens

    adapter = tiny_adapter("llama")
    g = torch.Generator().manual_seed(0)
    mats = {k: torch.eye(adapter.d_model) + 0.1 * torch.randn(adapter.d_model, adapter.d_model, generator=g)
            for k in range(1, adapter.num_layers)}
    lens = JacobianLens.from_matrices(mats, adapter.num_layers, {"model": "tiny"}, model=adapter)
    where = lens.push_to_hub("me/jl", hub=LocalHub(tmp_path))
    theirs = TLJacobianLens.load(f"{where}/jacobian_lens.pt")
    rebuilt = JacobianLens.from_matrices({k + 1: j for k, j in theirs.jacobians.items()}, adapter.num_layers,
                                         model=adapter)
    h = torch.randn(3, adapter.d_model)
    for k in mats:
        torch.testing.assert_close(rebuilt(h, k), lens(h, k), rtol=1e-5, atol=1e-5)


def test_a_push_onto_another_models_lens_is_refused(tmp_path):
    hub = LocalHub(tmp_path)
    _lens(tiny_adapter("llama")).push_to_hub("me/lenses", subfolder="x", hub=hub)
    other = _lens(tiny_adapter("llama", seed=5), "google/gemma-3-270m")  # same name, other weights
    with pytest.raises(LensesError, match="another model"):
        other.push_to_hub("me/lenses", subfolder="x", hub=hub)
    other.push_to_hub("me/lenses", subfolder="y", hub=hub)  # another folder is fine
    other.push_to_hub("me/lenses", subfolder="x", hub=hub, overwrite=True)
    saved = json.loads((tmp_path / "me/lenses/main/x/config.json").read_text())
    assert saved["fingerprint"] == other.config["fingerprint"]
    with pytest.raises(LensesError, match="owner/name"):
        other.push_to_hub("no-owner", hub=hub)
    with pytest.raises(LensesError, match="tuned lenses only"):
        JacobianLens.from_matrices({1: torch.eye(32)}, 3).push_to_hub("me/x", format="tuned-lens", hub=hub)


def test_push_cli(tmp_path, capsys):
    adapter = tiny_adapter("llama")
    lens = _lens(adapter)
    lens.save_pretrained(tmp_path / "run")
    assert main(["push", str(tmp_path / "run"), "me/cli", "--hub-dir", str(tmp_path / "hub")]) == 0
    assert "pushed the tuned lens" in capsys.readouterr().out
    assert isinstance(load_lens(tmp_path / "hub/me/cli/main", adapter), TunedLens)
    assert "Held-out KL" in card(lens, "lenses")
