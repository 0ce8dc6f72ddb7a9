"""The README's recipes for other tools, as tests: hidden states captured by TransformerLens 4's bridge
are our hidden[l], and our lenses decode them to the model's own logits at the last layer."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_lens, save_tiny_model

from lenses import ModelAdapter


def test_transformer_lens_4_bridge_recipe(tmp_path):
    pytest.importorskip("transformer_lens", reason="transformer-lens==4.3.0 (the 'tl' test extra) is not installed")
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "llama", "llama")
    # --- the recipe (README, "Other tools")
    bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)  # no weight processing
    bridge.eval()
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 33]])
    logits, cache = bridge.run_with_cache(ids)
    L = bridge.cfg.n_layers
    stream = [cache[f"blocks.{l}.hook_in"] for l in range(L)] + [cache["ln_final.hook_in"]]  # = our hidden[0..L]
    # --- checked against our adapter on the same weights
    adapter = ModelAdapter.from_model(AutoModelForCausalLM.from_pretrained(path).eval())
    ours = adapter.hidden_states(ids)
    for l in range(L + 1):
        torch.testing.assert_close(stream[l], ours[l], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"blocks.{L - 1}.hook_out"], ours[L])  # the J-lens's h_final
    lens = random_lens(adapter)
    torch.testing.assert_close(lens(stream[L], L), logits.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lens(stream[1], 1), lens(ours[1], 1), atol=1e-5, rtol=1e-5)


def test_nnterp_recipe(tmp_path):
    pytest.importorskip("nnterp", reason="nnterp==1.3.0 (in the 'test' extra) is not installed")
    from nnterp import StandardizedTransformer
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "llama", "llama")
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 33]])
    # --- the recipe (README, "Other tools")
    nt = StandardizedTransformer(str(path), device_map="cpu", dtype=torch.float32)
    L = nt.num_layers
    stream = []
    with nt.trace(ids):
        for l in range(L):
            stream.append(nt.layers_input[l].save())  # = our hidden[l]
        stream.append(nt.ln_final.input.save())  # = our hidden[L]
        logits = nt.logits.save()
    # --- checked against our adapter on the same weights
    adapter = ModelAdapter.from_model(AutoModelForCausalLM.from_pretrained(path).eval())
    ours = adapter.hidden_states(ids)
    assert len(stream) == len(ours) == L + 1
    for l in range(L + 1):
        torch.testing.assert_close(stream[l], ours[l], atol=1e-5, rtol=1e-5)
    lens = random_lens(adapter)
    torch.testing.assert_close(lens(stream[L], L), logits.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lens(stream[1], 1), lens(ours[1], 1), atol=1e-5, rtol=1e-5)
