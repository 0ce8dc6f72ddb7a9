"""The adapter finds the parts of every family, and the lenses agree with the model itself."""

import pytest
import torch
from tiny_models import FAMILIES, tiny_model
from torch import nn

from lenses import LogitLens, ModelAdapter, ModelStructureError, TunedLens, engine


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    return request.param, tiny_model(request.param)


def _ids(batch=2, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 96, (batch, seq), generator=g)


def test_last_layer_lens_equals_model_logits(family_model):
    _, model = family_model
    adapter = ModelAdapter.from_model(model, verify=False)  # check independently of verify()
    ids = _ids()
    expected = model(input_ids=ids).logits
    hidden = adapter.hidden_states(ids)
    got = LogitLens(adapter)(hidden[adapter.num_layers], adapter.num_layers)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_untrained_tuned_lens_equals_logit_lens(family_model):
    _, model = family_model
    adapter = ModelAdapter.from_model(model)
    hidden = adapter.hidden_states(_ids())
    logit, tuned = LogitLens(adapter), TunedLens.for_model(adapter)
    for layer in range(adapter.num_layers + 1):
        torch.testing.assert_close(tuned(hidden[layer], layer), logit(hidden[layer], layer), rtol=0, atol=0)


def test_hidden_states_follow_output_hidden_states(family_model):
    _, model = family_model
    adapter = ModelAdapter.from_model(model)
    ids = _ids()
    ours = adapter.hidden_states(ids)
    theirs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert ours.shape[0] == len(theirs) == adapter.num_layers + 1
    for layer in range(adapter.num_layers):  # HF's last entry is after the final norm
        torch.testing.assert_close(ours[layer], theirs[layer], rtol=1e-5, atol=1e-6)
    # ...and ours[L] is exactly what that final norm was applied to
    torch.testing.assert_close(adapter.final_norm(ours[-1]), theirs[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_softcapping_is_honoured(family):
    cap = 0.1  # below the raw logits of the random model, so capping changes them
    model = tiny_model(family, final_logit_softcapping=cap)
    adapter = ModelAdapter.from_model(model)  # verify() compares with the model's own logits
    assert adapter.softcap == cap
    h = adapter.hidden_states(_ids())[-1]
    raw = adapter.unembed(adapter.final_norm(h))
    assert raw.abs().max() > 2 * cap
    torch.testing.assert_close(engine.decode(adapter, h), cap * torch.tanh(raw / cap))


def test_gemma_norm_uses_one_plus_weight():
    model = tiny_model("gemma")
    adapter = ModelAdapter.from_model(model)
    x = torch.randn(4, model.config.hidden_size)
    w = adapter.final_norm.weight
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    torch.testing.assert_close(adapter.final_norm(x), rms * (1 + w), rtol=1e-5, atol=1e-6)


class _NoParts(nn.Module):
    """A causal-LM-shaped object whose blocks are not in a ModuleList."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"num_hidden_layers": 2, "model_type": "custom"})()
        self.block0, self.block1 = nn.Linear(4, 4), nn.Linear(4, 4)

    def get_output_embeddings(self):
        return nn.Linear(4, 10)


def test_missing_parts_error_names_the_fix():
    with pytest.raises(ModelStructureError, match=r"decoder layers.*layers='model.layers'"):
        ModelAdapter.from_model(_NoParts())


def test_explicit_parts_override_search():
    model = tiny_model("llama")
    adapter = ModelAdapter.from_model(model, layers="model.layers", final_norm="model.norm", unembed="lm_head")
    assert adapter.layers is model.model.layers and adapter.unembed is model.lm_head


def test_wrong_explicit_norm_is_caught_by_verification():
    model = tiny_model("llama")
    with pytest.raises(ModelStructureError, match="does not run after the last block"):  # a block's own norm
        ModelAdapter.from_model(model, final_norm="model.layers.0.input_layernorm")


def test_device_map_auto_model_gives_the_same_hidden_states(tmp_path):
    """A model dispatched by accelerate (two blocks offloaded to disk, run through accelerate's hooks,
    as device_map="auto" does when memory runs out) reads the same hidden states and logits."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    where = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
             "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=where,
                                                  offload_folder=str(tmp_path / "offload")).eval()
    assert "disk" in set(getattr(mapped, "hf_device_map", {}).values())
    ids = torch.randint(1, 96, (2, 7))
    a, b = ModelAdapter.from_model(model), ModelAdapter.from_model(mapped)
    torch.testing.assert_close(b.hidden_states(ids), a.hidden_states(ids))
    torch.testing.assert_close(TunedLens.for_model(b)(b.hidden_states(ids)[1], 1),
                               LogitLens(a)(a.hidden_states(ids)[1], 1))


def test_offloaded_unembedding_is_refused_with_advice(tmp_path):
    from transformers import AutoModelForCausalLM

    from lenses import LensesError

    tiny_model("llama").save_pretrained(tmp_path / "m")
    where = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
             "lm_head": "disk"}
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=where, offload_folder=str(tmp_path / "o"))
    with pytest.raises(LensesError, match="unembedding is offloaded to disk"):
        ModelAdapter.from_model(mapped)
