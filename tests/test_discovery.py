"""Each rule of the structural search (`lenses.model.discovery`), on tiny models of the families its
docstring names; the whole search and its refusals over every causal-LM type are tests/test_coverage.py."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from lenses.base.errors import LensesError, UnsupportedModelError
from lenses.model import discovery


@pytest.mark.parametrize("family,path", [("llama", "model.layers"), ("gpt2", "transformer.h"),
                                         ("gpt_neox", "gpt_neox.layers"), ("opt", "model.decoder.layers"),
                                         ("bloom", "transformer.h")])
def test_find_layers_takes_the_list_the_config_counts(family, path):
    model = tiny_model(family)
    assert discovery.find_layers(model) == path
    assert len(model.get_submodule(path)) == model.config.num_hidden_layers


def test_find_layers_refuses_blocks_split_over_parallel_lists():
    model = tiny_model("llama")
    model.model.twins = nn.ModuleList([nn.Linear(2, 2) for _ in model.model.layers])  # a second list of the same length
    with pytest.raises(UnsupportedModelError, match="parallel lists"):
        discovery.find_layers(model)


@pytest.mark.parametrize("family,path", [("llama", "model.norm"), ("gpt2", "transformer.ln_f"),
                                         ("gpt_neox", "gpt_neox.final_layer_norm"), ("gemma2", "model.norm")])
def test_find_final_norm_is_the_norm_run_after_the_last_block(family, path):
    model = tiny_model(family)
    assert discovery.find_final_norm(model, discovery.find_layers(model)) == path


def test_find_unembedding_and_no_head_transform_for_a_plain_decoder():
    model = tiny_model("llama")
    head = discovery.find_unembedding(model)
    assert head is model.lm_head
    assert discovery.head_transform(model, head, model.model.layers) is None
    assert discovery.stream_head(model, "model.layers", head.in_features) is None  # one stream, unembedding-wide


def test_find_unembedding_refuses_several_heads():
    model = tiny_model("llama")
    model.get_output_embeddings = lambda: nn.ModuleList([model.lm_head, model.lm_head])
    with pytest.raises(UnsupportedModelError, match="output heads"):
        discovery.find_unembedding(model)


def test_logit_transform_reads_softcap_and_scales():
    assert discovery.logit_transform(tiny_model("gemma2").config) == (2.0, 1.0)
    assert discovery.logit_transform(tiny_model("llama").config) == (None, 1.0)
    cfg = tiny_model("llama").config
    cfg.logits_scaling = 4.0  # Granite divides the logits
    assert discovery.logit_transform(cfg) == (None, 0.25)


def test_check_placement_refuses_an_offloaded_norm():
    norm = nn.LayerNorm(4, device="meta")
    with pytest.raises(LensesError, match="offloaded"):
        discovery.check_placement(norm, nn.Linear(4, 8))
    discovery.check_placement(nn.LayerNorm(4), nn.Linear(4, 8))


def test_find_parts_is_what_the_adapter_uses():
    from lenses.model.adapter import ModelAdapter

    model = tiny_model("gemma2")
    parts = discovery.find_parts(model)
    adapter = ModelAdapter.from_model(model)
    assert parts.layers is adapter.layers and parts.final_norm is adapter.final_norm
    assert parts.unembed is adapter.unembed and parts.softcap == adapter.softcap == 2.0
    h = torch.randn(1, 3, model.config.hidden_size)
    assert torch.equal(parts.final_norm(h), model.model.norm(h))
