"""Models whose residual stream is several parallel streams (hyper-connections): DeepSeek-V4 keeps
[batch, seq, 4, d] and mixes the four with a learned head before its final norm; Qwen4-Exp keeps them
side by side in one [batch, seq, 4d] vector and mixes them at the end. Lenses read the stream
flattened per position; checked against the model's own outputs and a raw hook in its own layout."""

from __future__ import annotations

import pytest
import torch

from lenses import LogitLens, ModelAdapter
from lenses.engine import decode
from lenses.jobs.jlens_estimator import prompt_jacobian
from lenses.model.intervene import edit_residual, final_logits


def tiny(model_type: str):
    sweep = __import__("lenses.jobs.coverage", fromlist=["main"])
    torch.manual_seed(0)
    return sweep.build(model_type, sweep.tiny_config(model_type)).eval()


@pytest.mark.parametrize("model_type, shape, head", [("deepseek_v4", (4, 64), "model.hc_head -> model.norm"),
                                                     ("qwen4_exp_text", (256,), "model.hyper_connection_mixer")])
def test_parallel_streams_are_read_flattened(model_type, shape, head):
    torch.set_num_threads(1)
    model = tiny(model_type)
    adapter = ModelAdapter.from_model(model)
    assert adapter.stream_shape == shape and adapter.d_model == 256 and adapter.final_norm_path == head
    ids = torch.tensor([[5, 17, 3, 99, 42, 8, 61, 7]])
    hidden = adapter.hidden_states(ids)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    L = adapter.num_layers
    assert hidden.shape == (L + 1, 1, 8, 256)
    for layer in range(L):  # the model's own states, flattened per position
        torch.testing.assert_close(hidden[layer], out.hidden_states[layer].flatten(2))
    torch.testing.assert_close(decode(adapter, hidden[L]), out.logits.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(LogitLens(adapter)(hidden[L][0, 3], L), out.logits[0, 3].float(), atol=1e-5, rtol=1e-5)
    # an edit of the flattened state = the same edit in the model's own layout, by a raw pre-hook
    v = torch.randn(256, generator=torch.Generator().manual_seed(1))
    with edit_residual(adapter, {1: lambda h: h + v}):
        ours = final_logits(adapter, ids)

    def raw(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        new = h + v.reshape(shape)
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    handle = adapter.layers[1].register_forward_pre_hook(raw, with_kwargs=True)
    try:
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        handle.remove()
    assert not torch.allclose(want, out.logits.float(), atol=1e-3)  # the edit changes the output
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_jacobian_of_parallel_streams_equals_autograd():
    """The J-lens of a 4-stream model is 256 x 256 (all streams); the fit equals autograd of the definition."""
    torch.set_num_threads(1)
    model = tiny("deepseek_v4")
    adapter = ModelAdapter.from_model(model)
    ids = [3, 7, 11, 5, 9, 2]
    J = prompt_jacobian(adapter, torch.tensor(ids), [1], skip_first=2, dim_batch=64)[0]
    assert J.shape == (256, 256)
    L = adapter.num_layers
    base = adapter.hidden_states(torch.tensor([ids]))[1]

    def last(x):
        captured = {}
        with edit_residual(adapter, {1: lambda h: x, L: lambda h: captured.setdefault("h", h)}):
            adapter.run_stream(torch.tensor([ids]), grad=True)
        return captured["h"]

    full = torch.autograd.functional.jacobian(last, base)[0, :, :, 0]  # [T, d, T, d]
    V = range(2, len(ids) - 1)
    want = sum(full[tp, :, t, :] for t in V for tp in V) / len(V)
    torch.testing.assert_close(J, want, atol=1e-4, rtol=1e-4)


def test_a_projection_after_the_final_norm():
    """OPT with word_embed_proj_dim < hidden_size: final norm, then project_out to the unembedding's width.
    The stream is read at its own width (64) and decoded through both, as the model does."""
    import transformers

    from lenses import TunedLens

    cfg = transformers.AutoConfig.for_model("opt", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            ffn_dim=128, word_embed_proj_dim=32, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    adapter = ModelAdapter.from_model(model)
    assert adapter.final_norm_path == "model.decoder.final_layer_norm -> model.decoder.project_out"
    assert adapter.d_model == 64 and adapter.unembed.in_features == 32
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    hidden = adapter.hidden_states(ids)
    with torch.no_grad():
        torch.testing.assert_close(decode(adapter, hidden[-1]), model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert TunedLens.for_model(adapter)(hidden[1], 1).shape == (1, 5, 100)
    with pytest.raises(Exception, match="64 wide but the unembedding reads 32"):
        ModelAdapter.from_model(model, final_norm="model.decoder.final_layer_norm")


@pytest.mark.parametrize("model_type, given", [("qwen4_exp_text", "model.hyper_connection_mixer"),
                                               ("deepseek_v4", "model.hc_head")])
def test_a_given_final_module_reads_the_stream_in_the_models_shape(model_type, given):
    """The user names the mixer (as the width refusal tells them to): it gets the stream in the model's own
    layout, and decoding reproduces the logits where that module is all the model runs (Qwen4-Exp); where
    the model runs a norm after it (DeepSeek-V4), the numeric check says so."""
    from lenses.base.errors import ModelStructureError

    model = tiny(model_type)
    if model_type == "deepseek_v4":
        with pytest.raises(ModelStructureError, match="does not reproduce the model's logits"):
            ModelAdapter.from_model(model, final_norm=given)
        return
    adapter = ModelAdapter.from_model(model, final_norm=given)  # verify(): decoding equals the logits
    assert adapter.final_norm_path == given and adapter.d_model == 256
    ids = torch.tensor([[5, 17, 3, 99]])
    with torch.no_grad():
        torch.testing.assert_close(decode(adapter, adapter.hidden_states(ids)[-1]), model(input_ids=ids).logits.float(),
                                   atol=1e-5, rtol=1e-5)
