"""Saving, loading, refusing lenses made for other models, and the tuned-lens package format."""

import json

import pytest
import torch
from tiny_models import tiny_adapter, tiny_model
from torch import nn

from lenses import CorruptFileError, LensesError, LensMismatchError, ModelAdapter, TunedLens, engine
from lenses.kinds.load import export_tuned_lens


@pytest.fixture(scope="module")
def llama():
    return tiny_adapter("llama")


def _trained_like(adapter, seed=0):
    lens = TunedLens.for_model(adapter)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(torch.randn(lens.weight.shape, generator=g) * 0.1)
        lens.bias.copy_(torch.randn(lens.bias.shape, generator=g) * 0.1)
    return lens


def test_round_trip_is_exact(tmp_path, llama):
    lens = _trained_like(llama)
    lens.save_pretrained(tmp_path)
    loaded = TunedLens.from_pretrained(tmp_path, model=llama)
    assert torch.equal(loaded.weight, lens.weight) and torch.equal(loaded.bias, lens.bias)
    h = torch.randn(3, llama.d_model)
    for layer in range(llama.num_layers + 1):
        assert torch.equal(loaded(h, layer), lens(h, layer))
    assert json.loads((tmp_path / "config.json").read_text())["fingerprint"] == llama.fingerprint()


def test_load_without_model_then_attach(tmp_path, llama):
    _trained_like(llama).save_pretrained(tmp_path)
    lens = TunedLens.from_pretrained(tmp_path)
    with pytest.raises(LensesError, match="no model attached"):
        lens(torch.randn(2, llama.d_model), 0)
    lens.attach(llama)
    assert lens(torch.randn(2, llama.d_model), 0).shape == (2, llama.vocab_size)


def test_lens_for_other_weights_is_refused(tmp_path, llama):
    _trained_like(llama).save_pretrained(tmp_path)
    other = tiny_adapter("llama", seed=7)  # same shapes, other weights
    with pytest.raises(LensMismatchError, match="another model with the same shapes"):
        TunedLens.from_pretrained(tmp_path, model=other)
    TunedLens.from_pretrained(tmp_path, model=other, strict=False)  # explicit override works


def test_lens_for_other_shapes_is_refused(tmp_path, llama):
    _trained_like(llama).save_pretrained(tmp_path)
    deeper = tiny_adapter("llama", num_hidden_layers=4)
    with pytest.raises(LensMismatchError, match="3 layers of width 32, but the model has 4 layers"):
        TunedLens.from_pretrained(tmp_path, model=deeper)


def test_fingerprint_survives_dtype_cast(tmp_path, llama):
    _trained_like(llama).save_pretrained(tmp_path)
    bf16 = ModelAdapter.from_model(tiny_model("llama").to(torch.bfloat16), verify=False)
    TunedLens.from_pretrained(tmp_path, model=bf16)


def test_truncated_weights_are_reported(tmp_path, llama):
    _trained_like(llama).save_pretrained(tmp_path)
    file = tmp_path / "translators.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        TunedLens.from_pretrained(tmp_path)


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(LensesError, match="no lens at"):
        TunedLens.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("prefix", ["", "layer_translators."])
def test_reads_tuned_lens_package_layout(tmp_path, llama, prefix):
    """A lens in the tuned-lens package's layout, written here with plain nn.Linear translators."""
    translators = nn.ModuleList(nn.Linear(llama.d_model, llama.d_model) for _ in range(llama.num_layers))
    params = {f"{prefix}{k}": v for k, v in translators.state_dict().items()}
    torch.save(params, tmp_path / "params.pt")
    (tmp_path / "config.json").write_text(
        json.dumps({"base_model_name_or_path": "tiny", "d_model": llama.d_model,
                    "num_hidden_layers": llama.num_layers, "bias": True, "lens_type": "linear_tuned_lens"})
    )
    lens = TunedLens.from_pretrained(tmp_path, model=llama)
    h = torch.randn(5, llama.d_model)
    for layer, t in enumerate(translators):
        with torch.no_grad():
            expected = engine.decode(llama, h + t(h))  # the tuned-lens package's definition: h + translator(h)
        torch.testing.assert_close(lens(h, layer), expected, rtol=1e-5, atol=1e-5)


def test_export_then_import_tuned_lens_format(tmp_path, llama):
    lens = _trained_like(llama)
    export_tuned_lens(lens, tmp_path)
    params = torch.load(tmp_path / "params.pt", weights_only=True)
    assert set(params) == {f"{i}.{k}" for i in range(3) for k in ("weight", "bias")}  # nn.ModuleList keys
    back = TunedLens.from_pretrained(tmp_path, model=llama)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)


def test_shipped_lens_loads_by_name_without_a_model():
    from lenses.kinds.registry import available

    assert "smollm2-135m-instruct" in available()
    lens = TunedLens.from_pretrained("smollm2-135m-instruct")
    assert (lens.num_layers, lens.d_model) == (30, 576) and lens.weight.dtype == torch.float32
    assert lens.weight.abs().max() > 0.01  # trained, not zeros
    kl = lens.config["heldout_kl_nats"]
    assert len(kl) == 30 and all(a > b for a, b in zip(kl[:1], kl[-1:]))  # decreasing from first to last layer
    assert lens.config["training"]["train_tokens"] >= 300_000
