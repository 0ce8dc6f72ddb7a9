"""Trace statistics against a float64 brute force, and the depth bookkeeping on hand-built trajectories."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import VOCAB, random_lens, tiny_adapter, tiny_model

from lenses import LogitLens, ModelAdapter, engine
from lenses.engine import kernels
from lenses.tracing.depth import depth_summary, flipped, onset_curve, onset_layer, settled_layer
from lenses.tracing.trace import TraceItem, trace


def _brute_force(family, lens, ids, positions, target, groups):
    """Every statistic in float64, all layers at once (fine at this size), written from the definitions."""
    model = tiny_model(family).double()
    adapter = ModelAdapter.from_model(model)
    hidden = adapter.hidden_states(torch.tensor([ids]))[:, 0, positions]  # [L+1, P, d]
    rows = {}
    with torch.no_grad():
        return _brute_force_layers(adapter, lens, hidden, target, groups, rows)


def _brute_force_layers(adapter, lens, hidden, target, groups, rows):
    L = adapter.num_layers
    for name in ("logit", "tuned"):
        logits = []
        for layer in range(L + 1):
            h = hidden[layer]
            if name == "tuned" and layer < L:
                h = h + h @ lens.weight[layer].double().T + lens.bias[layer].double()
            logits.append(engine.decode(adapter, h))
        z = torch.stack(logits)  # [L+1, P, V]
        p = torch.softmax(z, -1)
        logp_final = torch.log_softmax(z[-1], -1)
        rows[name] = {
            "top1_id": z.argmax(-1),
            "top1_prob": p.max(-1).values,
            "entropy": -(p * p.log()).sum(-1),
            "kl": (logp_final.exp() * (logp_final - p.log())).sum(-1),
            "rank": torch.tensor([[1 + int((z[l, j] > z[l, j, t]).sum()) for j,
                                   t in enumerate(target)] for l in range(L + 1)]),
            "prob": torch.stack([p[:, j, t] for j, t in enumerate(target)], -1),
            "mass_g0": (p * (groups == 0)).sum(-1),
            "mass_g1": (p * (groups == 1)).sum(-1),
            "gap": torch.stack([(z[:, j] - z[:, j, t : t + 1]).abs().sort(-1).values[:, 1] for j,
                                t in enumerate(target)], -1),
        }
    return rows


@pytest.mark.parametrize("family,chunk", [("llama", 3), ("gpt2", 5), ("gemma2", 4)])
def test_trace_matches_float64_brute_force(family, chunk):
    model = tiny_model(family)
    adapter = ModelAdapter.from_model(model)
    lens = random_lens(adapter, scale=0.1)
    g = torch.Generator().manual_seed(3)
    texts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (9, 7, 11)]
    pos_sets = [[0, 3, 4, 8], [-1, 2, 5], [1, 10, 6]]  # 10 rows: no chunk size above divides it
    targets = [[int(t) for t in torch.randint(0, VOCAB, (len(p),), generator=g)] for p in pos_sets]
    groups = torch.randint(-1, 2, (VOCAB,), generator=g)
    items = [TraceItem(ids, pos, {"answer": t}) for ids, pos, t in zip(texts, pos_sets, targets)]
    df = trace(adapter, {"logit": LogitLens(adapter), "tuned": lens}, items, groups=groups,
               group_names=["g0", "g1"], chunk=chunk)
    L = adapter.num_layers
    assert len(df) == 2 * (L + 1) * 10
    for i, (ids, pos, t) in enumerate(zip(texts, pos_sets, targets)):
        keep = [p % len(ids) for p in pos]
        ref = _brute_force(family, lens, ids, keep, t, groups)
        for name in ("logit", "tuned"):
            sub = df[(df.lens == name) & (df.item == i)]
            for j, p in enumerate(keep):
                got = sub[sub.position == p].sort_values("layer")
                r = {k: v[:, j].numpy() for k, v in ref[name].items()}
                np.testing.assert_allclose(got.top1_prob, r["top1_prob"], rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(got.entropy, r["entropy"], rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(got.kl, r["kl"], rtol=1e-3, atol=1e-5)
                np.testing.assert_allclose(got.prob_answer, r["prob"], rtol=1e-4, atol=1e-7)
                np.testing.assert_allclose(got.mass_g0, r["mass_g0"], rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(got.mass_g1, r["mass_g1"], rtol=1e-4, atol=1e-6)
                clear = r["gap"] > 1e-4  # float32 may order near-ties differently
                np.testing.assert_array_equal(got.rank_answer.to_numpy()[clear], r["rank"][clear])
                np.testing.assert_array_equal(got.top1_id.to_numpy()[clear], r["top1_id"][clear])
                assert (got.target_answer == t[j]).all()
                assert got.kl.iloc[-1] == pytest.approx(0, abs=1e-5)


def test_trace_bf16_unembedding_stays_close():
    adapter = tiny_adapter("llama")
    items = [TraceItem(list(range(1, 13)), list(range(12)), {"next": list(range(2, 14))})]
    a = trace(adapter, {"logit": LogitLens(adapter)}, items)
    b = trace(adapter, {"logit": LogitLens(adapter)}, items, dtype=torch.bfloat16)
    np.testing.assert_allclose(a.entropy, b.entropy, atol=0.05)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: soft-capped, (1 + w) final norm
def test_bf16_rescored_trace_keeps_top1_and_near_ranks_exact(family):
    """A 16-bit vocabulary matmul re-scored in float32 (`engine.decode_rescored`) against a float64 decode of
    the same states: top-1 ids and ranks up to the number of re-scored candidates identical, target
    probabilities and KL within the 16-bit error."""
    adapter = ModelAdapter.from_model(tiny_model(family, vocab_size=3000))
    lens = random_lens(adapter, scale=0.1)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 3000, (40,), generator=g).tolist()
    final = engine.decode(adapter, adapter.hidden_states(torch.tensor([ids]))[-1, 0, :39])
    tenth = final.topk(10, dim=-1).indices[:, -1].tolist()  # rank 10 at the last layer: near the top somewhere
    items = [TraceItem(ids, list(range(39)), {"next": tenth})]
    lenses = {"logit": LogitLens(adapter), "tuned": lens}
    fast = trace(adapter, lenses, items, dtype=torch.bfloat16, chunk=16)
    assert fast.attrs["decode_dtype"] == "bfloat16"
    with torch.no_grad():
        ref = _brute_force_layers(ModelAdapter.from_model(adapter.model.double()), lens.double(),
                                  adapter.hidden_states(torch.tensor([ids]))[:, 0, :39].double(), tenth,
                                  torch.zeros(3000, dtype=torch.long), {})
    adapter.model.float(), lens.float()
    for name in lenses:
        got = fast[fast.lens == name].sort_values(["position", "layer"])
        r = {k: v.transpose(0, 1).reshape(-1).numpy() for k, v in ref[name].items() if k not in ("mass_g0", "mass_g1")}
        clear = r["gap"] > 1e-4
        np.testing.assert_array_equal(got.top1_id.to_numpy(), r["top1_id"])
        near = clear & (r["rank"] <= engine.RESCORED)
        assert near.sum() > 0
        np.testing.assert_array_equal(got.rank_next.to_numpy()[near], r["rank"][near])
        np.testing.assert_allclose(got.prob_next, r["prob"], rtol=2e-2, atol=1e-7)
        np.testing.assert_allclose(got.top1_prob, r["top1_prob"], rtol=2e-2)
        by_layer = got.groupby("layer").kl.mean().to_numpy()
        want = r["kl"].reshape(39, -1).mean(0)
        np.testing.assert_allclose(by_layer[:-1], want[:-1], rtol=1e-2)  # mean KL per layer within 1%


def test_rescored_decode_redoes_a_row_whose_top_the_16bit_error_could_hide():
    """With one candidate and near-tied logits the bound cannot exclude the other tokens: the row is decoded
    whole in float32; with clearly separated logits it is not."""
    adapter = tiny_adapter("llama")
    x = torch.randn(6, adapter.d_model)
    exact = engine.decode(adapter, x)
    z, redone = engine.decode_rescored(adapter, x, torch.bfloat16, candidates=1)
    assert torch.equal(z.argmax(-1), exact.argmax(-1))
    tight = (exact.topk(2).values[:, 0] - exact.topk(2).values[:, 1]) < 0.05
    assert redone >= int(tight.sum())
    every, none = engine.decode_rescored(adapter, x, torch.bfloat16, candidates=exact.shape[-1])
    assert none == 0  # every token re-scored: nothing left to doubt, and every logit is float32's
    torch.testing.assert_close(every, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,skewed", [("llama", False), ("gemma2", True)])
@pytest.mark.parametrize("candidates", [1, engine.RESCORED])  # 1: many rows decoded whole in float32
def test_rescored_stats_equal_the_statistics_of_the_rescored_logits(family, skewed, candidates):
    """`engine.rescored_stats` (sums over the 16-bit row, corrected at the re-scored tokens, no float32 logits)
    against `row_stats` of `decode_rescored`'s logits and the group mass of their softmax: the same ids and
    ranks, the same values within float32 rounding; targets that repeat each other or a candidate included."""
    adapter = ModelAdapter.from_model(tiny_model(family, vocab_size=3000))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, adapter.d_model, generator=g) * 3
    top = engine.decode(adapter, x).argmax(-1)
    t_ids = torch.stack([top, torch.randint(0, 3000, (24,), generator=g), top], 1)  # top-1 twice
    groups = torch.randint(0, 4, (3000,), generator=g)
    if skewed:  # as token-frequency buckets: small groups, one large group, tokens in none (-1)
        groups = torch.where(torch.rand(3000, generator=g) < 0.9, 3, groups)
        groups[torch.randperm(3000, generator=g)[:200]] = -1
    p = torch.softmax(torch.randn(24, 3000, generator=g), -1)
    neg_h = (p * p.log()).sum(-1)
    with torch.no_grad():
        z, redone = engine.decode_rescored(adapter, x, torch.bfloat16, t_ids, candidates=candidates)
        want = (*engine.row_stats(z, p, neg_h, t_ids),
                torch.zeros(24, 5).index_add_(1, groups % 5, torch.softmax(z, -1))[:, :4])
        got, redone2 = engine.rescored_stats(adapter, x, torch.bfloat16, p, neg_h, t_ids, engine.TokenGroups(groups, 4),
                                            candidates=candidates)
    assert redone2 == redone and (redone > 0) == (candidates == 1)
    names = ["top1_id", "top1_prob", "entropy", "kl", "ranks", "probs", "mass"]
    for name, a, b in zip(names, want, got):
        if a.dtype == torch.long:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_the_statistics_kernels_compile_one_graph_for_any_targets_and_groups(monkeypatch):
    """``torch.compile`` gives sizes 0 and 1 graphs of their own (~10 s each on a fresh machine, once per view),
    so the kernels see at least two target columns and rows, and "no groups" shaped as groups: 0, 1 and 3
    targets, with and without groups, 1, 5 and 24 rows, compile once per kernel, and each call's statistics are
    the 3-target call's columns."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("LENSES_COMPILE", "1")
    torch._dynamo.reset()  # graphs earlier tests compiled would be reused, not counted
    monkeypatch.setitem(kernels.KERNELS, "rescored", kernels.KERNELS["rescored"].fresh())
    monkeypatch.setitem(kernels.KERNELS, "stats", kernels.KERNELS["stats"].fresh())
    monkeypatch.setitem(kernels.KERNELS, "gather_dot", kernels.KERNELS["gather_dot"].fresh())
    adapter = ModelAdapter.from_model(tiny_model("llama", vocab_size=3000))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(24, adapter.d_model, generator=g) * 3
    t3 = torch.randint(0, 3000, (24, 3), generator=g)
    groups = engine.TokenGroups(torch.randint(-1, 4, (3000,), generator=g), 4)
    p = torch.softmax(torch.randn(24, 3000, generator=g), -1)
    neg_h = (p * p.log()).sum(-1)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        # first, 5 rows and 5 group columns (4 groups + the rest): sizes that differ later must not share a symbol
        engine.rescored_stats(adapter, x[:5], torch.bfloat16, p[:5], neg_h[:5], t3[:5], groups)
        full, _ = engine.rescored_stats(adapter, x, torch.bfloat16, p, neg_h, t3, groups)
        if kernels.KERNELS["rescored"].compiled is kernels._rescored_stats:
            pytest.skip("torch.compile is not available here")
        for n, gr in [(1, None), (0, groups), (1, groups), (3, None), (0, None)]:
            got, _ = engine.rescored_stats(adapter, x, torch.bfloat16, p, neg_h, t3[:, :n], gr)
            assert got[4].shape == (24, n) and got[5].shape == (24, n) and (got[6] is None) == (gr is None)
            assert torch.equal(got[0], full[0]) and torch.equal(got[4], full[4][:, :n])
            for a, b in zip(got[1:4] + got[5:6] + (got[6:] if gr is not None else ()),
                            full[1:4] + (full[5][:, :n],) + (full[6:] if gr is not None else ())):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        one, _ = engine.rescored_stats(adapter, x[7:8], torch.bfloat16, p[7:8], neg_h[7:8], t3[7:8], groups)  # one row
        assert one[0].shape == (1,) and torch.equal(one[0], full[0][7:8]) and torch.equal(one[4], full[4][7:8])
        for a, b in zip(one[1:4] + one[5:], full[1:4] + full[5:]):
            torch.testing.assert_close(a, b[7:8], rtol=1e-5, atol=1e-6)
        z = engine.decode(adapter, x)
        every = engine.row_stats(z, p, neg_h, t3)
        for n in (1, 0, 3):
            got = engine.row_stats(z, p, neg_h, t3[:, :n])
            assert got[4].shape == (24, n) and torch.equal(got[4], every[4][:, :n])
            torch.testing.assert_close(got[5], every[5][:, :n])
        got = engine.row_stats(z[2:3], p[2:3], neg_h[2:3], t3[2:3])
        assert got[0].shape == (1,) and torch.equal(got[4], every[4][2:3])
        torch.testing.assert_close(got[3], every[3][2:3])
    assert counters["stats"]["unique_graphs"] - graphs == 3  # the two statistics kernels and `_exact`'s


@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_kernels_warmed_up_in_the_background_are_the_ones_tracing_uses(monkeypatch):
    """`engine.warm_up_in_background` (the analysis CLI starts it before the model loads) compiles every kernel
    a bfloat16 trace calls, for any vocabulary: after it, tracing a model of another vocabulary size (not a
    multiple of the top-k block), with and without token groups, down to a one-row chunk, compiles nothing."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("LENSES_COMPILE", "1")
    torch._dynamo.reset()
    for name in ("rescored", "stats", "block_max", "gather_dot"):
        monkeypatch.setitem(kernels.KERNELS, name, kernels.KERNELS[name].fresh())
    thread = engine.warm_up_in_background(torch.bfloat16)
    model = tiny_model("llama", vocab_size=40_007)  # built while the kernels compile
    adapter, lens = ModelAdapter.from_model(model), {"logit": None}
    lens["logit"] = LogitLens(adapter)
    thread.join()
    if kernels.KERNELS["rescored"].compiled is kernels._rescored_stats:
        pytest.skip("torch.compile is not available here")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 4
    g = torch.Generator().manual_seed(5)
    items = [TraceItem(torch.randint(0, 40_007, (n,), generator=g).tolist(), [n - 2, n - 1], {"next": [1, 2]})
             for n in (9, 12, 7)]
    groups = torch.bucketize(torch.randperm(40_007, generator=g), torch.tensor([10, 100, 1000]))  # frequency buckets
    for chunk in (4, 5):  # chunks of 4 and 2 rows, 5 and 1
        trace(adapter, lens, items, chunk=chunk, dtype=torch.bfloat16, groups=groups, group_names=("a", "b", "c", "d"))
        trace(adapter, lens, items, chunk=chunk, dtype=torch.bfloat16)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("V", [49152, 50257, 3000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_top_ids_are_the_highest_entries(V, dtype):
    """`engine.top_ids` (block maxima, then the best blocks) picks entries whose values are exactly topk's,
    for rows that are and are not a whole number of blocks, with ties (bfloat16 rounds many values alike)."""
    g = torch.Generator().manual_seed(V)
    z = (torch.randn(19, V, generator=g) * 4).to(dtype)
    z[3, 100:140] = z[3].max()  # a 40-way tie at the top
    # the last block's bound (its last 64 columns) overlaps the block before: rows where it ties the best block
    # and the second-highest entry sits in another block (a top-k among only k blocks would miss it)
    last = V // engine.TOPK_BLOCK * engine.TOPK_BLOCK - 1 if V % engine.TOPK_BLOCK else V - 1
    z[5, last], z[5, 7] = 50, 40
    z[6, V - 1], z[6, 70] = 50, 40
    for k in (1, 2, 32):
        got = engine.top_ids(z, k)
        assert got.shape == (19, k) and all(len(set(r)) == k for r in got.tolist())
        assert torch.equal(z.gather(1, got).sort(-1).values, z.topk(k, -1).values.sort(-1).values)
    assert torch.equal(engine.top_ids(z[5:6], 2).sort(-1).values, z[5:6].topk(2, -1).indices.sort(-1).values)


@pytest.mark.parametrize("bias", [False, True])
def test_float32_unembedding_in_vocabulary_blocks_equals_a_float64_matmul(bias):
    """On CPU a float32 unembedding of more than two `engine.VOCAB_BLOCK`s runs block by block (into ``out``
    when given): the logits equal a float64 matmul, with and without a bias, and the last, short block too."""
    V = 2 * engine.VOCAB_BLOCK + 777
    adapter = ModelAdapter.from_model(tiny_model("llama", vocab_size=V))
    if bias:
        adapter.unembed.bias = torch.nn.Parameter(torch.randn(V))
    u = torch.randn(5, 3, adapter.d_model)
    w = adapter.unembed.weight.double()
    want = u.double() @ w.T + (adapter.unembed.bias.double() if bias else 0)
    with torch.no_grad():
        got = engine.unembed(adapter, u, torch.float32)
        buf = torch.empty(15, V)
        into = engine.unembed(adapter, u, torch.float32, out=buf)
    assert got.shape == (5, 3, V) and into.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(into.double(), want, rtol=1e-5, atol=1e-5)


# ---- hand-built trajectories ----------------------------------------------------------------


def test_onset_settled_flips_on_hand_built_trajectories():
    ranks = np.array(
        [
            [50, 7, 1, 1, 1],  # correct from layer 2 on
            [9, 9, 9, 9, 9],  # never correct
            [3, 3, 3, 3, 1],  # correct only at the last layer
            [1, 2, 1, 4, 1],  # correct early, lost, back: settles only at the end
            [1, 1, 1, 1, 1],  # always correct
            [1, 1, 1, 1, 2],  # correct early, wrong at the end: never settled
        ]
    )
    np.testing.assert_array_equal(onset_layer(ranks, 1), [2, np.nan, 4, 0, 0, 0])
    np.testing.assert_array_equal(onset_layer(ranks, 8), [1, np.nan, 0, 0, 0, 0])
    np.testing.assert_array_equal(onset_layer(ranks, 10), [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(settled_layer(ranks == 1), [2, np.nan, 4, 4, 0, np.nan])
    top1 = np.array([[5, 5, 7, 7], [7, 7, 7, 7], [1, 2, 3, 4]])
    np.testing.assert_array_equal(flipped(top1), [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 6), min_size=4, max_size=4), min_size=1, max_size=8))
def test_settled_matches_plain_loop(rows):
    ranks = np.array(rows)
    got = settled_layer(ranks == 1)
    for r, g in zip(ranks, got):
        expect = np.nan
        for layer in range(len(r)):
            if all(x == 1 for x in r[layer:]):
                expect = layer
                break
        assert (np.isnan(g) and np.isnan(expect)) or g == expect
        onset = next((i for i, x in enumerate(r) if x == 1), np.nan)
        assert (np.isnan(onset) and np.isnan(onset_layer(r[None], 1)[0])) or onset_layer(r[None], 1)[0] == onset
        if not np.isnan(g):  # settling never comes before the first correct layer
            assert g >= onset


def test_depth_summary_and_onset_curve_from_a_trace_table():
    import pandas as pd

    ranks = {("tuned", 0, 5): [4, 1, 1], ("tuned", 1, 2): [20, 12, 1], ("logit", 0, 5): [900, 30, 1]}
    rows = [{"lens": k[0], "item": k[1], "position": k[2], "layer": l, "rank_t": r}
            for k, rs in ranks.items() for l, r in enumerate(rs)]
    summary = depth_summary(pd.DataFrame(rows).sample(frac=1, random_state=0), "t", ks=(1, 10, 100))
    s = summary.set_index(["lens", "item", "position"])
    assert s.loc[("tuned", 0, 5), "first_correct"] == 1 and s.loc[("tuned", 1, 2), "settled"] == 2
    assert s.loc[("logit", 0, 5), "onset_k100"] == 1 and s.loc[("logit", 0, 5), "onset_k10"] == 2
    curve = onset_curve(summary, ks=(1, 10, 100)).set_index(["lens", "k"])
    assert curve.loc[("tuned", 10), "mean_layer"] == pytest.approx(1.0)  # (0 + 2) / 2
    assert curve.loc[("tuned", 1), "n"] == 2


def test_non_finite_hidden_states_are_named(monkeypatch):
    from lenses import LensesError

    adapter = tiny_adapter("llama")
    real = adapter.hidden_states

    def overflowing(ids, *a, **k):
        h = real(ids, *a, **k)
        h[2:, :, 1] = float("inf")  # as if float16 overflowed in block 2
        return h

    monkeypatch.setattr(adapter, "hidden_states", overflowing)
    with pytest.raises(LensesError, match="from layer 2 on.*float32 or bfloat16"):
        trace(adapter, {"logit": LogitLens(adapter)}, [TraceItem([1, 2, 3, 4], [1, 3])])


# ---- batched tracing: texts of different lengths share a forward pass, the table is unchanged ----

BATCH_FAMILIES = {  # model_type -> what it adds to the check
    "llama": "rotary positions", "gpt2": "absolute learned positions", "opt": "learned positions with an offset",
    "bloom": "ALiBi", "falcon": "ALiBi or rotary (default)", "mistral": "sliding-window attention (window 4)",
    "gemma2": "sliding window + soft-capping", "qwen2": "grouped-query attention", "gpt_neox": "parallel blocks",
    "phi3": "fused projections", "mamba": "state space (no attention)", "jamba": "attention + Mamba hybrid",
}


@pytest.mark.parametrize("model_type", sorted(BATCH_FAMILIES))
def test_batched_trace_equals_one_text_at_a_time(model_type):
    from lenses.jobs.coverage import build, tiny_config

    config = tiny_config(model_type)
    if model_type in ("mistral", "gemma2"):
        config.sliding_window = 4  # shorter than the texts: the window matters
    torch.manual_seed(0)
    model = build(model_type, config).eval().requires_grad_(False)
    adapter = ModelAdapter.from_model(model)
    lens = random_lens(adapter)
    g = torch.Generator().manual_seed(1)
    V = min(adapter.vocab_size, 90)
    items = []
    for n in (5, 17, 9, 12, 6, 20, 11):
        ids = torch.randint(1, V, (n,), generator=g).tolist()
        pos = sorted({0, n // 2, n - 1})
        items.append(TraceItem(ids, pos, {"next": torch.randint(1, V, (len(pos),), generator=g).tolist()}))
    lenses_ = {"logit": LogitLens(adapter), "tuned": lens}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refusal would warn: every family here must batch
        one = trace(adapter, lenses_, items)
        many = trace(adapter, lenses_, items, batch_size=4)
    assert len(one) == len(many) == 2 * sum(len(it.positions) for it in items) * (adapter.num_layers + 1)
    assert (one.top1_id.to_numpy() == many.top1_id.to_numpy()).all()
    assert (one.rank_next.to_numpy() == many.rank_next.to_numpy()).all()
    for col in ("top1_prob", "kl", "entropy", "prob_next"):
        np.testing.assert_allclose(many[col].to_numpy(), one[col].to_numpy(), atol=1e-5, rtol=0, err_msg=col)


def test_a_model_that_padding_changes_is_traced_one_text_at_a_time():
    """A model that reads the whole row (here: a block that adds the mean over all positions, pads
    included) fails the padding check: trace warns with the reason and gives the one-at-a-time table."""
    adapter = tiny_adapter("llama")
    block = adapter.layers[0]

    def peek_ahead(module, args, kwargs, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + h.mean(1, keepdim=True)  # not causal: every position sees every other
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = block.register_forward_hook(peek_ahead, with_kwargs=True)
    try:
        items = [TraceItem([1, 2, 3, 4, 5, 6, 7], [6]), TraceItem([3, 4, 5], [2])]
        one = trace(adapter, {"logit": LogitLens(adapter)}, items)
        with pytest.warns(UserWarning, match="one text at a time: padding changes"):
            many = trace(adapter, {"logit": LogitLens(adapter)}, items, batch_size=2)
    finally:
        handle.remove()
    pd.testing.assert_frame_equal(one, many)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "bloom", "olmo2"])
def test_a_shared_prefix_runs_once_and_changes_nothing(family):
    """Texts that start alike (a few-shot header, a chat template's system turn): the prefix runs once and each
    batch continues from its cache; the table equals the one made without sharing (top-1 ids identical,
    probabilities and KL within 1e-5), positions inside the prefix stay out of it."""
    from lenses.tracing.batching import shared_prefix
    from lenses.tracing.trace import _prepared

    adapter = tiny_adapter(family)
    g = torch.Generator().manual_seed(0)
    head = torch.randint(1, 90, (24,), generator=g).tolist()
    items = [TraceItem(head + torch.randint(1, 90, (int(n),), generator=g).tolist(), [23, 24, 25, -1],
                       {"next": [5, 6, 7, 8]}) for n in torch.randint(4, 12, (9,), generator=g)]
    prefix = shared_prefix(adapter, _prepared(items, ["next"]))
    assert prefix is not None and prefix.length == 23  # up to the first position asked for
    lenses = {"logit": LogitLens(adapter), "tuned": random_lens(adapter)}
    shared = trace(adapter, lenses, items, batch_size=4)
    full = trace(adapter, lenses, items, batch_size=4, share_prefix=False)
    np.testing.assert_array_equal(shared.top1_id.to_numpy(), full.top1_id.to_numpy())
    for col in ("prob_next", "top1_prob", "kl", "entropy"):
        np.testing.assert_allclose(shared[col], full[col], atol=1e-5)
    early = [TraceItem(it.ids, [5], {"next": [1]}) for it in items]  # a position inside the common part
    assert shared_prefix(adapter, _prepared(early, ["next"])) is None  # shorter than MIN_PREFIX: recomputed


def test_batches_close_where_pads_would_pass_a_tenth_of_a_busy_batch():
    """Worked by hand: on CPU a batch stops growing once it holds 128 real tokens and the next text would make
    pads more than 10% of it; below 128 tokens (and on a GPU, below 8,192) only the batch size closes it."""
    from lenses.tracing.batching import batches

    lengths = [300, 290, 200, 199, 198, 50, 10, 9]
    todo = [(i, torch.zeros(n, dtype=torch.long), [0]) for i, n in enumerate(lengths)]

    def sizes(device, batch_size=4, skip=0):
        return [[len(t[1]) for t in b] for b in batches(todo, batch_size, torch.device(device), skip)]

    # 3 x 300 = 900 > 1.1 x 790; 4 x 200 = 800 > 1.1 x 647; 50 + 10 + 9 < 128 tokens
    assert sizes("cpu") == [[300, 290], [200, 199, 198], [50, 10, 9]]
    assert sizes("cuda") == [[300, 290, 200, 199], [198, 50, 10, 9]]
    assert sizes("cpu", batch_size=1) == [[n] for n in lengths]
    # a shared prefix runs from its cache, so only what follows it counts: texts of 300 and 265 tokens share a
    # batch (600 <= 1.1 x 565), but not after a prefix of 150 (2 x 150 > 1.1 x 265)
    todo[:] = [(i, torch.zeros(n, dtype=torch.long), [0]) for i, n in enumerate([300, 265])]
    assert sizes("cpu") == [[300, 265]]
    assert sizes("cpu", skip=150) == [[300], [265]]


@pytest.mark.slow
@pytest.mark.ci  # compiles: out of the fast tier, in CI
def test_a_missing_compiler_falls_back_to_eager_and_a_kernel_bug_surfaces_as_itself(monkeypatch):
    """Rule 6 of `engine.kernels`: the compiler's own failure (here: no C++ compiler) runs the kernel eagerly, with a
    warning and the same numbers; an error of the kernel's own code is raised as itself, not hidden by a fallback."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("LENSES_COMPILE", "1")
    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/g++",))
    g = torch.Generator().manual_seed(0)
    z, p = torch.randn(3, 50, generator=g), torch.softmax(torch.randn(3, 50, generator=g), -1)
    args = (z, p, (p * p.log()).sum(-1), torch.zeros(3, 2, dtype=torch.long))
    kernel = kernels.KERNELS["stats"].fresh()
    with pytest.warns(UserWarning, match="torch.compile unavailable"):
        got = kernel(*args)
    assert kernel.compiled is kernel.fn  # eager for good
    for a, b in zip(got, kernels._row_stats(*args)):
        assert torch.equal(a, b)

    def broken(z):
        raise ValueError("a bug in the kernel")

    torch._dynamo.reset()
    monkeypatch.undo()  # the C++ compiler back
    monkeypatch.setenv("LENSES_COMPILE", "1")
    bug = kernels.Kernel(broken, rows=(0,))
    with pytest.raises(ValueError, match="a bug in the kernel"):
        bug(z)
    assert bug.compiled is not bug.fn  # not mistaken for a compiler failure: the kernel stays compiled
