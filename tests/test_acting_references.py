"""lenses.causal against the reference libraries on the same inputs: TransformerLens 4.3 (J-space decomposition
and coordinate patch), tuned-lens 0.2 (causal bases) and nnterp 1.3 (Patchscopes). Each comparison also fails
on a mutated result (a coordinate's sign, a missed normalisation, an off-by-one layer), so the tolerance can
tell a right answer from a wrong one."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model, tiny_model

from lenses import ModelAdapter, TunedLens
from lenses.causal import decompose, patch_coordinate
from lenses.causal.fidelity import causal_basis, principal_angles
from lenses.causal.patchscope import IDENTITY_PROMPT, patchscope_grid

needs = lambda name: pytest.mark.skipif(importlib.util.find_spec(name) is None,  # noqa: E731
                                        reason=f"{name} (the test extra) is not installed")
ALGORITHMS = {"nomp": "nonnegative_orthogonal_matching_pursuit", "gradient": "gradient_pursuit"}


def _problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(300, 24, generator=g, dtype=torch.float64)
    x = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5) @ D[:6] + 0.1 * torch.randn(24, generator=g,
                                                                                              dtype=torch.float64)
    return x, D


def _agree(ours, theirs) -> float:
    """The largest coordinate difference, or inf when the supports differ."""
    if ours.support.tolist() != theirs.support.tolist():
        return float("inf")
    return float((ours.coordinates - theirs.coordinates.double()).abs().max())


@needs("transformer_lens")
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_decomposition_equals_transformer_lens(algorithm):
    from transformer_lens.tools.analysis.jacobian_lens_decomposition import get_sparse_decomposition

    for seed in range(4):
        x, D = _problem(seed)
        ours = decompose(x, D, 10, algorithm)
        theirs = get_sparse_decomposition(x.float(), D.float(), 10, algorithm=ALGORITHMS[algorithm])
        assert _agree(ours, theirs) < 1e-5
        torch.testing.assert_close(ours.component, theirs.j_space_component.double(), atol=1e-5, rtol=0)
        wrong = decompose(x, D, 10, algorithm)
        wrong.coordinates[0] *= -1  # mutation: a coordinate's sign
        assert _agree(wrong, theirs) > 1e-3
        unnormalised = decompose(x, D * torch.linspace(0.2, 3, 300, dtype=torch.float64)[:, None], 10, algorithm)
        assert _agree(unnormalised, theirs) > 1e-3  # mutation: atoms of other norms, as a missed normalisation


@needs("transformer_lens")
@pytest.mark.parametrize("mode", ["swap", "substitute"])
def test_coordinate_patch_equals_transformer_lens(mode):
    from transformer_lens.tools.analysis.jacobian_lens_coordinate_patch import solve_coordinate_patch

    x, D = _problem(7)
    source = int(decompose(x, D, 10).support[0])
    for target, alpha in ((250, 1.0), (250, 0.6), (int(decompose(x, D, 10).support[1]), 1.0)):
        ours = patch_coordinate(x, D, source, target, mode, alpha, k=10)
        theirs = solve_coordinate_patch(x.float(), D.float(), source, target, k=10, mode=mode, alpha=alpha)
        assert ours.frame.tolist() == theirs.support_after.tolist()
        torch.testing.assert_close(ours.after, theirs.coordinates_after.double(), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.patched, theirs.patched.double(), atol=1e-5, rtol=0)
        flipped = patch_coordinate(x, D, source, target, mode, -alpha, k=10)  # mutation: the edit's sign
        assert (flipped.patched - theirs.patched.double()).abs().max() > 1e-3


@needs("tuned_lens")
def test_causal_basis_equals_tuned_lens(monkeypatch):
    """The subspace tuned-lens 0.2's extract_causal_bases finds (mean ablation, L-BFGS), from the same start,
    on a tiny model whose vocabulary equals its width (tuned-lens transforms the unembedding as states there,
    which only runs when V = d), for states with a strong 2-d variation: principal angles below 1e-4 rad at every
    layer, where the search moves the basis by more than 1 rad from its start."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for layer, init, ref, mine, ours, hs in causal_basis_case():
        assert principal_angles(mine.vectors, ref.vectors).max() < 1e-4
        assert principal_angles(init, ref.vectors).max() > 1.0
        torch.testing.assert_close(mine.energies, ref.energies, atol=1e-6, rtol=1e-3)
        other = causal_basis(ours, hs[layer], layer, 2, mode="zero", init=init)  # mutation: another ablation
        assert principal_angles(other.vectors, ref.vectors).max() > 1e-2


def causal_basis_case(k: int = 2):
    """Per layer ``(layer, start, tuned-lens's basis, ours, our lens, states)``: a tiny Llama whose vocabulary is
    its width, a tuned lens of small random translators in both packages, states with a strong k-d variation."""
    import tuned_lens.model_surgery as surgery
    from tuned_lens import TunedLens as PackageLens
    from tuned_lens.causal import extract_causal_bases

    surgery._transformer_lens_available = False  # tuned-lens 0.2 probes a class TransformerLens 4 removed
    model = tiny_model("llama", vocab_size=32)
    theirs = PackageLens.from_model(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in theirs:
            t.weight.normal_(0, 0.05, generator=g)
            t.bias.normal_(0, 0.05, generator=g)
    folder = tempfile.mkdtemp()
    theirs.save(folder)
    adapter = ModelAdapter.from_model(model)
    ours = TunedLens.from_pretrained(folder, model=adapter)
    L = adapter.num_layers
    U = torch.linalg.qr(torch.randn(32, k, generator=g))[0]
    hs = [torch.randn(2, 12, 32, generator=g) + 10 * torch.randn(2, 12, k, generator=g) @ U.T for _ in range(L + 1)]
    refs = list(extract_causal_bases(theirs, hs, k, mode="mean"))
    for layer in range(L):
        start = theirs.transform_hidden(theirs.unembed.unembedding.weight.data.T, layer)
        init = torch.linalg.svd(start, full_matrices=False)[0][:, :k].float()
        yield layer, init, refs[layer], causal_basis(ours, hs[layer], layer, k, mode="mean", init=init), ours, hs


@needs("nnterp")
@pytest.mark.slow
@pytest.mark.ci
def test_patchscope_equals_nnterp():
    from nnterp import StandardizedTransformer
    from nnterp.interventions import TargetPrompt, patchscope_lens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_model(Path(tempfile.mkdtemp()) / "llama", "llama")
    nt = StandardizedTransformer(str(path), device_map="cpu", dtype=torch.float32)
    adapter = ModelAdapter.from_model(AutoModelForCausalLM.from_pretrained(path).eval())
    tokenizer = AutoTokenizer.from_pretrained(path)
    for source in ("hello world", "The capital of France is"):
        theirs = patchscope_lens(nt, source, TargetPrompt(IDENTITY_PROMPT, -1))[0]  # [L, V]: block outputs 0..L-1
        ours = patchscope_grid(adapter, tokenizer, source)  # [L+1, V]: hidden[0..L]
        assert (ours[1:] - theirs).abs().max() < 1e-5
        assert (ours[:-1] - theirs).abs().max() > 1e-4  # mutation: their layer i as our i, not i + 1 (near-uniform)
