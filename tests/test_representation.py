"""Representation metrics: closed forms, orderings, and a slow reference written from the formulas."""

import math

import numpy as np
import pytest
import torch
from tiny_models import tiny_adapter

from lenses.analysis.representation import (
    augment,
    curvature,
    dime,
    effective_rank,
    infonce,
    lidar,
    normalised_entropy,
    representation_view,
)


def _orthonormal_rows(t, d, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:t]


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_entropy_closed_forms(alpha):
    # centred orthonormal rows: T-1 equal eigenvalues -> maximal entropy log(T-1) -> normalised 1
    assert normalised_entropy(_orthonormal_rows(8, 20), alpha) == pytest.approx(1.0, abs=1e-9)
    # without centring: T equal eigenvalues, bound T
    assert normalised_entropy(_orthonormal_rows(8, 20), alpha, center=False) == pytest.approx(1.0, abs=1e-9)
    same = torch.ones(6, 10) * torch.randn(10)
    assert normalised_entropy(same, alpha) == 0.0
    assert normalised_entropy(same, alpha, center=False) == pytest.approx(0.0, abs=1e-9)


def test_random_beats_low_rank():
    g = torch.Generator().manual_seed(0)
    random = torch.randn(40, 64, generator=g)
    low_rank = torch.randn(40, 2, generator=g) @ torch.randn(2, 64, generator=g)
    assert normalised_entropy(random) > 0.8 > 0.3 > normalised_entropy(low_rank)
    assert effective_rank(random) > 20 > 2.5 > effective_rank(low_rank)


def _slow_entropy(z, alpha, center=True):
    """Straight from the formula: normalise, full T x T Gram, unit trace, numpy eigenvalues."""
    z = np.asarray(z, dtype=np.float64)
    if center:
        z = z - z.mean(0)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    k = z @ z.T
    lam = np.clip(np.linalg.eigvalsh(k / np.trace(k)), 0, None)
    lam = lam[lam > 1e-15]
    h = -np.sum(lam * np.log(lam)) if alpha == 1 else np.log(np.sum(lam**alpha)) / (1 - alpha)
    t, d = z.shape
    return h / math.log(min(t - 1 if center else t, d))


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])  # both Gram forms
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_entropy_matches_slow_reference(shape, alpha):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) + 0.5
    assert normalised_entropy(z, alpha) == pytest.approx(_slow_entropy(z.numpy(), alpha), rel=1e-8)


def test_curvature_closed_forms_and_reference():
    a, b = torch.randn(5), torch.randn(5)
    straight = torch.stack([a + k * b for k in range(6)])
    assert curvature(straight) == pytest.approx(0.0, abs=1e-6)
    back_and_forth = torch.stack([a, a + b, a, a + b, a])
    assert curvature(back_and_forth) == pytest.approx(math.pi, abs=1e-6)
    z = torch.randn(9, 4, generator=torch.Generator().manual_seed(2)).double()
    angles = []
    for k in range(7):  # plain loop from the definition
        v1, v2 = (z[k + 1] - z[k]).numpy(), (z[k + 2] - z[k + 1]).numpy()
        angles.append(math.acos(np.dot(v1, v2) / np.linalg.norm(v1) / np.linalg.norm(v2)))
    assert curvature(z) == pytest.approx(np.mean(angles), rel=1e-9)


def test_infonce_identical_views_reach_the_floor():
    x = _orthonormal_rows(6, 16)
    floor = -math.log(math.exp(10) / (math.exp(10) + 5))  # tau = 0.1, off-diagonal cosines 0
    assert infonce(x, x) == pytest.approx(floor, rel=1e-9)
    noisy = x + 0.5 * torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert infonce(x, noisy) > infonce(x, x)


def test_dime_and_lidar_order_structured_above_random():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 8, generator=g)
    same = dime(x, x + 0.01 * torch.randn(30, 8, generator=g))
    unrelated = dime(x, torch.randn(30, 8, generator=g))
    assert same > unrelated and abs(unrelated) < same / 3
    # LiDAR counts discriminative directions: class means spread in all 8 vs in 2 directions
    noise = 0.1 * torch.randn(20, 4, 8, generator=g)
    full = 5 * torch.randn(20, 1, 8, generator=g) + noise
    flat = 5 * torch.cat([torch.randn(20, 1, 2, generator=g), torch.zeros(20, 1, 6)], dim=-1) + noise
    assert lidar(full) > 6 and lidar(flat) < 2.5


def test_augmentations_are_seeded_and_differ():
    text = "The quick brown foxes jumped over several lazy sleeping dogs near the river bank today"
    for kind in ("split", "edit", "typo"):
        a, b = augment(text, kind, rate=0.5, seed=1), augment(text, kind, rate=0.5, seed=1)
        assert a == b != text
    assert augment(text, "split", rate=0.5).replace(" ", "") == text.replace(" ", "")
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment(text, "shout")


def test_view_end_to_end_on_tiny_model(char_tokenizer):
    adapter = tiny_adapter("llama")
    prompts = [f"prompt number {i} says something about topic {i * 7}" for i in range(6)]
    summary, per_prompt = representation_view(adapter, char_tokenizer, prompts, progress=False)
    assert set(summary.metric) == {"prompt_entropy", "curvature", "effective_rank", "dataset_entropy",
                                   "infonce", "dime", "lidar"}
    assert set(summary.layer) == set(range(adapter.num_layers + 1))
    assert summary.relative_depth.between(0, 1).all()
    ent = per_prompt[per_prompt.metric == "prompt_entropy"].value
    assert len(ent) == 6 * (adapter.num_layers + 1) and ent.between(0, 1 + 1e-9).all()
    curv = per_prompt[per_prompt.metric == "curvature"].value
    assert curv.between(0, math.pi).all()
