"""The sub-layer view against a float64 recomputation written from its definitions on a tiny Llama: the
refinement events, which part made each, and each part's direct contribution through the RMS norm's
Jacobian (a closed form here, autograd's jvp in the view)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TEXT, byte_tokenizer, random_lens, tiny_model

from lenses import LogitLens, ModelAdapter, engine
from lenses.analysis.common import text_blocks
from lenses.analysis.sublayer import sublayer_view
from lenses.base.errors import UnsupportedModelError


def _rms_jvp(norm, x, v):
    """d/dt of w * y / sqrt(mean(y^2) + eps) at y = x along v, written out."""
    r = torch.sqrt((x * x).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * (v / r - x * (x * v).mean(-1, keepdim=True) / r**3)


def test_sublayer_events_parts_and_margins_match_a_float64_recomputation():
    adapter = ModelAdapter.from_model(tiny_model("llama", vocab_size=257))
    tok = byte_tokenizer()
    lenses = {"logit": LogitLens(adapter), "tuned": random_lens(adapter, scale=0.3)}
    result = sublayer_view(adapter, tok, lenses, [TEXT], num_positions=60, seq_len=32, seed=2)
    events = result.tables["events"]
    assert result.usage[0].used == 60 and len(events) > 20

    chosen, blocks, _, _ = text_blocks([TEXT], tok, 32, 60, 2, "sublayer")
    ids = torch.stack([blocks[b] for b in chosen])
    ad64 = ModelAdapter.from_model(tiny_model("llama", vocab_size=257).double())
    tuned = lenses["tuned"].double()
    parts = ad64.residual_parts(ids, with_hidden=True)
    h, attn, mlp = (parts[k][:, :, :-1].flatten(1, 2)[:, :60] for k in ("hidden", "attn", "mlp"))
    L, W = ad64.num_layers, ad64.unembed.weight.double()

    def state(name, x, layer):
        return x if name == "logit" or layer == L else x + x @ tuned.weight[layer].T + tuned.bias[layer]

    def linear(name, v, layer):
        return v if name == "logit" or layer == L else v + v @ tuned.weight[layer].T

    want = []
    with torch.no_grad():
        for name in lenses:
            top = [engine.decode(ad64, state(name, h[layer], layer)).argmax(-1) for layer in range(L + 1)]
            for layer in range(L):
                for i in (top[layer + 1] != top[layer]).nonzero().flatten().tolist():
                    old, new = int(top[layer][i]), int(top[layer + 1][i])
                    mid = int(engine.decode(ad64, state(name, h[layer, i] + attn[layer, i], layer)).argmax())
                    x = state(name, h[layer + 1, i], layer + 1)
                    m = [float((W[new] - W[old]) @ _rms_jvp(ad64.final_norm, x, linear(name, v[layer, i], layer + 1)))
                         for v in (attn, mlp)]
                    part = "attention" if mid == new else "mlp" if mid == old else "both"
                    want.append((name, i, layer, old, new, mid, part, *m))
    got = events.assign(i=(events["item"].map({b: k for k, b in enumerate(chosen)}) * 31 + events.position))
    got = sorted(zip(got.lens, got.i, got.layer, got.old_id, got.new_id, got.mid_id, got.part, got.attn_margin,
                     got.mlp_margin))
    want = sorted(want)
    assert [w[:7] for w in got] == [w[:7] for w in want]
    np.testing.assert_allclose([w[7:] for w in got], [w[7:] for w in want], rtol=1e-3, atol=1e-4)
    layers = result.tables["layers"]
    shares = layers[["share_attention", "share_mlp", "share_both"]].sum(1)
    np.testing.assert_allclose(shares, 1.0)
    assert (layers.share_mlp_ci_low <= layers.share_mlp).all()


def test_sublayer_view_refuses_a_model_without_parts_in_one_line():
    adapter = ModelAdapter.from_model(tiny_model("bloom", vocab_size=257))
    with pytest.raises(UnsupportedModelError, match="add the residual themselves"):
        sublayer_view(adapter, byte_tokenizer(), {"logit": LogitLens(adapter)}, [TEXT], num_positions=10, seq_len=32)


def test_the_grid_shows_half_layers_read_at_the_mid_block_state(tmp_path):
    from lenses.pages.grid import lens_grid, plot_grid
    from lenses.pages.grid_page import grid_html

    adapter = ModelAdapter.from_model(tiny_model("llama", vocab_size=257))
    tok = byte_tokenizer()
    lenses = {"logit": LogitLens(adapter), "tuned": random_lens(adapter, scale=0.3)}
    table = lens_grid(adapter, tok, "The quick brown fox", lenses, top_k=2, sublayers=True)
    L = adapter.num_layers
    assert sorted(table.layer.unique()) == sorted([*range(L + 1), *(l + 0.5 for l in range(L))])
    ad64 = ModelAdapter.from_model(tiny_model("llama", vocab_size=257).double())
    ids = torch.tensor([tok("The quick brown fox").input_ids])
    parts = ad64.residual_parts(ids, with_hidden=True)
    tuned = lenses["tuned"].double()
    with torch.no_grad():
        for layer in range(L):
            mid = parts["hidden"][layer, 0] + parts["attn"][layer, 0]
            for name, x in (("logit", mid), ("tuned", tuned.transform(mid, layer))):
                p = torch.softmax(engine.decode(ad64, x), -1)
                rows = table[(table.lens == name) & (table.layer == layer + 0.5)].sort_values("position")
                assert rows.id_1.tolist() == p.argmax(-1).tolist()
                np.testing.assert_allclose(rows.prob_1, p.max(-1).values.numpy(), rtol=1e-4)
    assert '"layers":[0,0.5,1,1.5' in grid_html(table).replace(" ", "")
    assert plot_grid(table, tmp_path / "g.png").stat().st_size > 0


def test_sublayers_on_a_model_without_parts_is_one_line_and_exit_2(tmp_path, capsys):
    from tiny_models import run_analyze, save_tiny_model

    model = save_tiny_model(tmp_path / "m", family="bloom")
    proc = run_analyze(["--model", model, "--lens", "logit", "--prompt", "Hello", "--sublayers", "--out",
                        tmp_path / "out", "--no-progress"], capsys)
    assert proc.returncode == 2 and "add the residual themselves" in proc.stderr, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
