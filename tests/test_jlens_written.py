"""The Jacobian-lens fit's written-out backward (`lenses.jobs.jlens_written`) against autograd through the model
itself, in float64; which blocks it serves; and the proof that sends other blocks back to autograd."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_jacobian import brute_force, rms_norm_in_input_dtype
from tiny_models import tiny_adapter, tiny_model

from lenses import ModelAdapter
from lenses.jobs import jlens_written
from lenses.jobs.jlens_estimator import row_blocks


def _J(adapter, ids, layers, skip, dim_batch=8, written=True):
    out = torch.zeros(len(layers), adapter.d_model, adapter.d_model, dtype=torch.float64)
    for start, rows in row_blocks(adapter, ids, layers, skip, dim_batch, written_ok=written):
        out[:, start : start + rows.shape[1]] = rows.double()
    return out


@pytest.fixture
def float64_norms(monkeypatch):
    """HF's RMS norms compute in float32 even in a float64 model; the float64 comparisons need float64 throughout."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2

    for module, name in ((modeling_llama, "LlamaRMSNorm"), (modeling_mistral, "MistralRMSNorm"),
                         (modeling_qwen2, "Qwen2RMSNorm")):
        monkeypatch.setattr(getattr(module, name), "forward", rms_norm_in_input_dtype)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])  # heads alone, grouped keys, q/k/v biases
def test_the_written_backward_equals_autograd_in_float64(family, float64_norms):
    adapter = ModelAdapter.from_model(tiny_model(family, seed=3).double())
    assert jlens_written.unsupported(adapter) is None
    ids = torch.randint(1, 90, (29,), generator=torch.Generator().manual_seed(4))
    assert jlens_written.capture(adapter, ids[:-1], 0, 16) is not None  # the proof holds: no silent fallback
    written = _J(adapter, ids, [0, 1, 2], 16, dim_batch=5)
    autograd = _J(adapter, ids, [0, 1, 2], 16, dim_batch=5, written=False)
    assert autograd.abs().max() > 0.1
    torch.testing.assert_close(written, autograd, atol=1e-11, rtol=0)
    # and the definition itself, one layer, with a short prefix
    torch.testing.assert_close(_J(adapter, ids[:12], [1], 3, dim_batch=4)[0], brute_force(adapter, ids[:12].tolist(),
                                                                                         1, 3), atol=1e-11, rtol=0)


@pytest.mark.parametrize("family,why", [("gemma2", "caps its scores"), ("olmo2", "not a Llama- or Gemma-family"),
                                        ("phi3", "not a Llama- or Gemma-family"), ("gpt2", "rotary")])
def test_other_blocks_are_left_to_autograd(family, why):
    """Gemma 2's capped scores, OLMo 2's whole-width query norms, Phi-3's fused projections, GPT-2's learned
    positions: each said, none served."""
    assert why in (jlens_written.unsupported(tiny_adapter(family)) or "")


@pytest.mark.parametrize("family", ["qwen3", "gemma", "gemma3_text"])  # query/key norms; 1 + w and GELU; sandwich
def test_the_written_backward_equals_autograd_on_more_block_forms(family):
    """Float32 (these models' norms compute in float32 whatever the model's dtype): to rounding."""
    adapter = tiny_adapter(family, seed=2)
    assert jlens_written.unsupported(adapter) is None
    ids = torch.randint(1, 90, (27,), generator=torch.Generator().manual_seed(6))
    assert jlens_written.capture(adapter, ids[:-1], 1, 16) is not None
    written, autograd = _J(adapter, ids, [1, 2], 16), _J(adapter, ids, [1, 2], 16, written=False)
    assert autograd.abs().max() > 0.1
    torch.testing.assert_close(written, autograd, atol=2e-5 * float(autograd.abs().max()), rtol=0)


def test_a_sliding_window_shorter_than_the_prompt_fails_the_proof():
    """Mistral's structure passes, but its attention sees only 6 positions back here: the recomputed blocks differ
    from the model's, the fit says so and runs autograd, whose numbers stand."""
    adapter = ModelAdapter.from_model(tiny_model("mistral", seed=1, sliding_window=6).double())
    ids = torch.randint(1, 90, (26,), generator=torch.Generator().manual_seed(5))
    assert jlens_written.unsupported(adapter) is None and jlens_written.capture(adapter, ids[:-1], 1, 16) is None
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        got = _J(adapter, ids, [1, 2], 16)
    assert any("written-out backward does not reproduce" in str(w.message) for w in said)
    torch.testing.assert_close(got, _J(adapter, ids, [1, 2], 16, written=False), atol=1e-9, rtol=0)
