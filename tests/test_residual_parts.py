"""`ModelAdapter.residual_parts`: what attention and the MLP add to the residual stream, per block, against
hooks on each family's own modules (named here by hand, independently of the structural search) and
against the sum identity ``hidden[l] + attn[l] + mlp[l] == hidden[l+1]``."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from lenses import ModelAdapter
from lenses.base.errors import UnsupportedModelError

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# model type -> (config beyond the small sizes, or None for tests/tiny_models.py's, the module names each
# block adds to the stream: (mixer, MLP) in the family's own code; None: the block has no MLP)
FAMILIES = {
    "llama": (None, ("self_attn", "mlp")),  # sequential pre-norm
    "gpt2": (None, ("attn", "mlp")),
    "gptj": (None, ("attn", "mlp")),  # parallel attention + MLP
    "gpt_neox": (None, ("attention", "mlp")),  # parallel (use_parallel_residual)
    "phi3": (None, ("self_attn", "mlp")),
    "gemma2": (None, ("post_attention_layernorm", "post_feedforward_layernorm")),  # post-norms
    "olmo2": (None, ("post_attention_layernorm", "post_feedforward_layernorm")),
    "falcon": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, parallel_attn=True,
                    new_decoder_architecture=False), ("self_attention", "mlp")),  # adds the parts in place
    "cohere": (dict(SMALL, num_key_value_heads=2), ("self_attn", "mlp")),  # parallel
    "mixtral": (dict(SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
                ("self_attn", "mlp")),  # mixture of experts
    "qwen2_moe": (dict(SMALL, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16), ("self_attn", "mlp")),  # routed + shared experts
    "mamba": (dict(hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, intermediate_size=64),
              ("mixer", None)),  # state-space mixer only
}


def _adapter(family: str) -> ModelAdapter:
    config, _ = FAMILIES[family]
    if config is None:
        return ModelAdapter.from_model(tiny_model(family))
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, vocab_size=96, **config)
    return ModelAdapter.from_model(AutoModelForCausalLM.from_config(cfg).eval())


def _own_hooks(adapter: ModelAdapter, names, ids) -> dict[str, torch.Tensor]:
    """The family's own modules' outputs, hooked by the names in FAMILIES."""
    got = {"attn": [], "mlp": []}

    def keep(key, module, args, output):
        got[key].append((output[0] if isinstance(output, tuple) else output).detach().clone())

    hooks = [getattr(b, n).register_forward_hook(lambda m, a, o, k=k: keep(k, m, a, o))
             for b in adapter.layers for k, n in zip(("attn", "mlp"), names) if n is not None]
    try:
        with torch.no_grad():
            adapter.model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.stack(v).reshape(len(adapter.layers), *ids.shape, -1) for k, v in got.items() if v}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_residual_parts_match_the_family_modules_and_add_up(family):
    adapter = _adapter(family)
    ids = torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    parts = adapter.residual_parts(ids, with_hidden=True)
    h = parts["hidden"]
    assert parts["attn"].shape == parts["mlp"].shape == h[1:].shape
    torch.testing.assert_close(h[:-1] + parts["attn"] + parts["mlp"], h[1:], rtol=1e-4, atol=1e-5)
    own = _own_hooks(adapter, FAMILIES[family][1], ids)
    torch.testing.assert_close(parts["attn"], own["attn"], rtol=1e-5, atol=1e-6)
    if FAMILIES[family][1][1] is None:
        assert not parts["mlp"].any()  # a mixer-only block adds no MLP part
        assert adapter.block_parts.mixer == ["state-space/recurrent mixer"] * adapter.num_layers
    else:
        torch.testing.assert_close(parts["mlp"], own["mlp"], rtol=1e-5, atol=1e-6)
        assert set(adapter.block_parts.mixer) == {"attention"}


def test_a_hybrid_model_gets_each_block_its_own_parts():
    """Jamba alternates Mamba and attention blocks, each followed by an MLP or a mixture of experts."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("jamba", vocab_size=96, **SMALL, num_key_value_heads=2, attn_layer_period=2,
                               attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                               mamba_d_state=4)
    adapter = ModelAdapter.from_model(AutoModelForCausalLM.from_config(cfg).eval())
    parts = adapter.block_parts
    assert parts.first == ["mamba", "self_attn"] and parts.second == ["feed_forward", "feed_forward"]
    assert parts.mixer == ["state-space/recurrent mixer", "attention"]
    out = adapter.residual_parts(torch.randint(1, 90, (1, 6)), with_hidden=True)
    torch.testing.assert_close(out["hidden"][:-1] + out["attn"] + out["mlp"], out["hidden"][1:], rtol=1e-4, atol=1e-5)


def test_a_block_whose_parts_add_the_residual_themselves_is_refused_with_the_reason():
    """BLOOM's attention and MLP each return the residual plus their contribution: no pair adds up."""
    adapter = ModelAdapter.from_model(tiny_model("bloom"))
    with pytest.raises(UnsupportedModelError, match="add the residual themselves"):
        adapter.residual_parts(torch.randint(1, 90, (1, 5)))
