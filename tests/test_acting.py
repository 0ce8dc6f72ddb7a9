"""Acting on the model along what a lens reads (lenses.causal, Lens.directions), checked against independent
computations: each lens's own decode (float64), closed forms, and the reference libraries TransformerLens 4.3
(J-space decomposition, coordinate patch), tuned-lens 0.2 (causal bases, subspace ablation) and nnterp 1.3
(Patchscopes)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from tiny_models import random_lens, tiny_adapter

from lenses import LogitLens
from lenses.base.errors import LensesError
from lenses.causal import ablate, remove_subspace, run_edited, steer
from lenses.causal.fidelity import aitchison
from lenses.kinds.jacobian import JacobianLens
from lenses.kinds.lens import Lens
from lenses.model.intervene import final_logits


def _lenses(adapter, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    L, d = adapter.num_layers, adapter.d_model
    jac = JacobianLens.from_matrices({k: torch.eye(d) + 0.1 * torch.randn(d, d, generator=g) for k in range(1, L)}, L,
                                     model=adapter)
    return {"logit": LogitLens(adapter), "tuned": random_lens(adapter, scale=0.2), "jacobian": jac}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "gpt_neox"])
def test_directions_give_every_lens_its_own_logits(family):
    """logit_t(h) = (v_t.h + u_t.b) / sigma(Mh + b) + c_t, exactly (the 1/sigma of the final norm aside), for
    RMSNorm, LayerNorm (centring) and Gemma's (1 + w) norm: compared with each lens's own decode in float64
    (soft-capping undone). A missed centring or norm weight fails it by far more than the tolerance."""
    adapter = tiny_adapter(family)
    adapter.model.double()
    h = 3 * torch.randn(7, adapter.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(adapter.vocab_size)
    for name, lens in _lenses(adapter).items():
        lens.double()
        for layer in range(adapter.num_layers + 1):
            if not lens.has_layer(layer):
                continue
            with torch.no_grad():
                want = lens(h, layer)
            if adapter.softcap:
                want = adapter.softcap * torch.atanh(want / adapter.softcap)
            got = lens.directions(layer, ids).logits(h)
            assert (got - want).abs().max() < 1e-5 * want.abs().max(), (name, layer)


def test_ablating_a_direction_zeroes_the_tokens_first_order_logit():
    adapter = tiny_adapter("llama")
    lens = random_lens(adapter, scale=0.2)
    h = torch.randn(1, 5, adapter.d_model, dtype=torch.float64)
    for layer in (0, 2, adapter.num_layers):
        D = lens.directions(layer, [3, 17])
        before = D.first_order(h)
        assert before.abs().min() > 1e-3
        for j in range(2):
            edited = ablate(D.vectors[j], position=None)(h)
            after = D.first_order(edited)
            assert after[..., j].abs().max() < 1e-6
            assert (after[..., 1 - j] - before[..., 1 - j]).abs().max() > 1e-6  # the other token's part moves
        one = ablate(D.vectors[0], position=2)(h)  # one position only
        assert torch.equal(one[:, [0, 1, 3, 4]], h[:, [0, 1, 3, 4]])
        assert D.first_order(one)[0, 2, 0].abs() < 1e-6


def test_zero_alpha_is_a_bit_identical_no_op_and_an_edit_at_L_is_an_edit_of_the_norm_input():
    adapter = tiny_adapter("llama")
    ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    v = torch.randn(adapter.d_model)
    plain = final_logits(adapter, ids)
    for layer in (0, 1, adapter.num_layers):
        assert torch.equal(run_edited(adapter, ids, {layer: steer(v, 0.0)}), plain)
        assert not torch.equal(run_edited(adapter, ids, {layer: steer(v, 0.5)}), plain)
    handle = adapter.norm_entry.register_forward_pre_hook(lambda m, args: (args[0] + 0.5 * v,) + args[1:])
    try:
        direct = final_logits(adapter, ids)
    finally:
        handle.remove()
    torch.testing.assert_close(run_edited(adapter, ids, {adapter.num_layers: steer(v, 0.5)}), direct)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, "1"])
def test_a_non_finite_alpha_is_refused(alpha):
    with pytest.raises(LensesError, match="alpha must be a finite number"):
        steer(torch.ones(4), alpha)


def test_out_of_range_layer_and_a_lens_without_directions_are_refused():
    adapter = tiny_adapter("llama")
    with pytest.raises(LensesError, match="layer 9 is out of range"):
        LogitLens(adapter).directions(9, [1])

    class Curved(Lens):
        kind = "curved"

        def transform(self, h, layer):
            return torch.tanh(h)

    curved = Curved.for_model(adapter)
    with pytest.raises(LensesError, match="the curved lens has no directions"):
        curved.directions(1, [1])
    jac = JacobianLens.from_matrices({2: torch.eye(adapter.d_model)}, adapter.num_layers, model=adapter)
    with pytest.raises(LensesError, match="no matrix for hidden state 1"):
        jac.directions(1, [1])


def test_aitchison_closed_form():
    """A tilt p1 ~ p0 exp(b x) moves clr by b (x - mean x): the same tilt of q gives +1, the opposite -1, an
    orthogonal one 0 (numpy reference)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    y -= (y - y.mean()) @ (x - x.mean()) / ((x - x.mean()) @ (x - x.mean())) * (x - x.mean())  # clr-orthogonal

    def tilt(logp, z, b):
        t = logp + b * z
        return t - np.log(np.exp(t).sum())

    p0, q0 = np.log(rng.dirichlet(np.ones(50))), np.log(rng.dirichlet(np.ones(50)))
    T = lambda a: torch.tensor(a)  # noqa: E731
    for b, z, want in ((0.7, x, 1.0), (-0.3, x, -1.0), (0.5, y, 0.0)):
        got = aitchison(T(p0), T(tilt(p0, x, 0.4)), T(q0), T(tilt(q0, z, b)))
        assert abs(float(got) - want) < 1e-9


@pytest.mark.skipif(importlib.util.find_spec("tuned_lens") is None, reason="tuned-lens 0.2 is not installed")
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_subspace_ablation_equals_tuned_lens(mode):
    from tuned_lens.causal import remove_subspace as theirs

    g = torch.Generator().manual_seed(2)
    h, A = torch.randn(4, 6, 16, generator=g), torch.randn(16, 3, generator=g)
    torch.testing.assert_close(remove_subspace(h, A, mode), theirs(h, A, mode), atol=1e-5, rtol=1e-5)


def test_resample_ablation_keeps_the_complement_and_takes_another_rows_component():
    g = torch.Generator().manual_seed(3)
    h, u = torch.randn(10, 8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    u = u / u.norm()
    out = remove_subspace(h, u, "resample", generator=torch.Generator().manual_seed(0))
    rest = lambda x: x - (x @ u)[:, None] * u  # noqa: E731
    torch.testing.assert_close(rest(out), rest(h))
    comp_in, comp_out = (h @ u).tolist(), (out @ u).tolist()
    assert sorted(comp_out) == pytest.approx(sorted(comp_in))  # a permutation of the components
    assert all(a != b for a, b in zip(comp_in, comp_out))  # without a fixed point


def test_pair_swap_exchanges_the_two_coordinates():
    """c = V^+ h for V = [v_s, v_t]: after the swap (alpha 1) the coordinates are exchanged and the part of h off
    the span is unchanged (float64 closed form); alpha 0 is the identity, alpha 2 overshoots by the same step."""
    from lenses.causal.edits import swap_pair

    g = torch.Generator().manual_seed(4)
    h = torch.randn(3, 12, generator=g, dtype=torch.float64)
    vs, vt = torch.randn(2, 12, generator=g, dtype=torch.float64)
    V = torch.stack([vs, vt], 1)
    coords = lambda x: (torch.linalg.pinv(V) @ x.T).T  # noqa: E731
    off = lambda x: x - (V @ coords(x).T).T  # noqa: E731
    out = swap_pair(h, vs, vt, 1.0)
    torch.testing.assert_close(coords(out), coords(h).flip(-1))
    torch.testing.assert_close(off(out), off(h))
    assert torch.equal(swap_pair(h, vs, vt, 0.0), h)
    torch.testing.assert_close(swap_pair(h, vs, vt, 2.0) - h, 2 * (out - h))


def test_reading_swap_exchanges_two_lens_scores_and_holds_the_next_ones():
    """After swap_reading, the lens's pre-norm scores (v.h + u.b) of source and target are exchanged and the held
    tokens' are unchanged (float64, independent of the solver: recomputed from the directions)."""
    from lenses.causal.swap import swap_reading

    adapter = tiny_adapter("llama")
    lens = random_lens(adapter, scale=0.2)
    h = 3 * torch.randn(adapter.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    layer, source, target = 2, 5, 40
    delta = swap_reading(lens, layer, h, source, target, hold=6)
    z = lens(h.float(), layer)
    held = [int(i) for i in z.topk(8).indices if int(i) not in (source, target)][:6]
    D = lens.directions(layer, [source, target] + held)
    before, after = D.vectors @ h + D.offset, D.vectors @ (h + delta) + D.offset
    torch.testing.assert_close(after[:2], before[:2].flip(0))
    torch.testing.assert_close(after[2:], before[2:])


def test_patchscope_of_a_prompts_own_last_state_is_the_model_and_generates_as_it_does():
    """Patching hidden[L] of a prompt's last position with its own state changes nothing: the distribution is the
    model's and the N tokens written are model.generate's greedy continuation (the reference: transformers)."""
    from tiny_models import byte_tokenizer, tiny_model

    from lenses import ModelAdapter
    from lenses.causal.patchscope import patchscope, source_states

    model = tiny_model("llama", vocab_size=257)
    tokenizer = byte_tokenizer()
    adapter = ModelAdapter.from_model(model)
    prompt = "hello there"
    state = source_states(adapter, tokenizer, prompt)[adapter.num_layers]
    probs, written = patchscope(adapter, tokenizer, state, adapter.num_layers, prompt, generate=4)
    ids = torch.tensor([tokenizer(prompt).input_ids])
    torch.testing.assert_close(probs, final_logits(adapter, ids)[0, -1].softmax(-1))
    want = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert written == want
    other, _ = patchscope(adapter, tokenizer, state.flip(0), adapter.num_layers, prompt)
    assert (other - probs).abs().max() > 1e-4  # another state reads differently (a multiple would not: the norm)
    with pytest.raises(LensesError, match="out of range"):
        patchscope(adapter, tokenizer, state, adapter.num_layers + 1, prompt)
