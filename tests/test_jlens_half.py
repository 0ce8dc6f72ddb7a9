"""The Jacobian-lens fit with half-precision backward matmuls (`lenses.jobs.jlens_half`): its J is within a tenth
of J's own sampling error over prompts (the ideal bootstrap, checked against resampling), and summing in
bfloat16 instead of float32 breaks that rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_adapter

from lenses.jobs import jlens_half
from lenses.jobs.jlens_estimator import fit_prompts, prompt_jacobian
from lenses.jobs.jlens_half import RULE, Spread, deviation_rule

LAYERS = [1, 2]


@pytest.fixture(scope="module", params=["written out", "autograd"])
def setting(request):
    """Both routes of the backward (`lenses.jobs.jlens_written`, and autograd's, which other blocks take)."""
    adapter = tiny_adapter("llama")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 60, (40,), generator=g) for _ in range(24)]
    reference = Spread()
    fit = fit_prompts(adapter, prompts, LAYERS, skip_first=4, dim_batch=8, spread=reference)
    return adapter, prompts, reference, fit, request.param == "written out"


def _stack(lens) -> torch.Tensor:
    return torch.stack([lens.matrices[k] for k in LAYERS])


def test_the_ideal_bootstrap_equals_resampling_the_prompts(setting):
    adapter, prompts, reference, _, written = setting
    per_prompt = torch.stack([prompt_jacobian(adapter, p, LAYERS, 4, 8) for p in prompts]).double()  # [n, k, d, d]
    rng = np.random.default_rng(0)
    draws = torch.stack([per_prompt[rng.integers(0, len(prompts), len(prompts))].mean(0) for _ in range(4000)])
    resampled = draws.std(0, unbiased=False).norm(dim=(-2, -1))  # per layer, as `Spread.standard_error`
    np.testing.assert_allclose(reference.standard_error().numpy(), resampled.numpy(), rtol=0.05)
    torch.testing.assert_close(reference.mean(), per_prompt.mean(0))


def test_a_bfloat16_backward_is_within_a_tenth_of_the_sampling_error(setting):
    adapter, prompts, reference, fit, written = setting
    half = fit_prompts(adapter, prompts, LAYERS, skip_first=4, dim_batch=8, backward_dtype=torch.bfloat16,
                       written=written)
    dev, se, passes = deviation_rule(_stack(half), reference)
    assert passes, (dev / se).tolist()
    assert (dev > 0).all()  # the backward did run in bfloat16 (a float32 one would match to rounding)
    same, _, _ = deviation_rule(_stack(fit), reference)
    assert float(same.max()) < 1e-4 * float(se.min())  # the reference itself: the mean of its own prompts


def test_summing_in_bfloat16_breaks_the_rule(setting, monkeypatch):
    adapter, prompts, reference, _, written = setting
    monkeypatch.setattr(jlens_half, "ACCUMULATE", torch.bfloat16)  # the mutation: no float32 accumulation
    half = fit_prompts(adapter, prompts, LAYERS, skip_first=4, dim_batch=8, backward_dtype=torch.bfloat16,
                       written=written)
    dev, se, passes = deviation_rule(_stack(half).float(), reference)
    assert not passes and float((dev / se).max()) > RULE, (dev / se).tolist()


def test_rounding_the_weights_to_nearest_breaks_the_rule(setting, monkeypatch):
    """Rounded to nearest, every prompt's backward has the same bias: more prompts never average it out."""
    adapter, prompts, reference, _, written = setting
    monkeypatch.setattr(jlens_half, "stochastic_round", lambda w, generator: w.to(torch.bfloat16))
    half = fit_prompts(adapter, prompts, LAYERS, skip_first=4, dim_batch=8, backward_dtype=torch.bfloat16,
                       written=written)
    dev, se, passes = deviation_rule(_stack(half), reference)
    assert not passes, (dev / se).tolist()


def test_lenses_fit_with_a_bfloat16_backward_records_it_and_refuses_fsdp(tmp_path, capsys):
    from tiny_models import save_tiny_model

    from lenses import load_lens
    from lenses.base.options import run_cli
    from lenses.commands import fit

    model = save_tiny_model(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"Document {i} says something new about lenses and layers. "
                                                     * 14 for i in range(8)), encoding="utf-8")
    args = ["--model", str(model), "--corpus", str(tmp_path / "corpus.txt"), "--num-prompts", "4", "--seq-len", "40",
            "--eval-tokens", "0", "--no-progress"]
    for dtype in ("float32", "bfloat16"):
        assert run_cli(fit.main, [*args, "--out", str(tmp_path / dtype), "--backward-dtype", dtype]) == 0
    lenses = {d: load_lens(str(tmp_path / d)) for d in ("float32", "bfloat16")}
    assert lenses["bfloat16"].config["backward_dtype"] == "bfloat16"
    for k in lenses["float32"].layers:
        a, b = lenses["float32"].matrices[k], lenses["bfloat16"].matrices[k]
        assert 0 < float((a - b).norm() / a.norm()) < 2e-2
    capsys.readouterr()
    assert run_cli(fit.main, [*args, "--out", str(tmp_path / "x"), "--backward-dtype", "bfloat16", "--fsdp"]) == 2
    assert "needs the whole model on each process" in capsys.readouterr().err
