"""Causal checks: interventions against independent computations (a truncated copy of the model, a
model with a block removed, nnsight), and the three views end to end on a tiny model."""

import copy
import importlib.util
import json

import pytest
import torch
from tiny_models import FAMILIES, byte_tokenizer, random_lens, tiny_adapter, tiny_model

from lenses import DataError, LensesError, LogitLens
from lenses.analysis.early_exit import early_exit_view
from lenses.analysis.layer_skip import layer_skip_view
from lenses.analysis.patching import bootstrap_ci, patching_view, read_task, read_tasks
from lenses.model.adapter import ModelAdapter
from lenses.model.intervene import edit_residual, final_logits, skip_block

IDS = torch.tensor([[5, 9, 2, 7, 1, 3, 8, 4]])


def _with_layers(model, adapter, keep):
    """A deep copy of ``model`` whose decoder-layer list holds only the blocks ``keep``."""
    clone = copy.deepcopy(model)
    path = next(name for name, mod in model.named_modules() if mod is adapter.layers)
    parent = clone.get_submodule(path.rsplit(".", 1)[0]) if "." in path else clone
    old = clone.get_submodule(path)
    setattr(parent, path.rsplit(".", 1)[-1], torch.nn.ModuleList([old[i] for i in keep]))
    for cfg in {id(c): c for c in (clone.config, getattr(clone.config, "text_config", clone.config))}.values():
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(cfg, key) and isinstance(getattr(cfg, key), int):
                setattr(cfg, key, len(keep))
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return clone


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logit_lens_exit_equals_a_truncated_model(family):
    """Early exit at layer l through the logit lens = the model cut after block l-1 (then its final norm
    and unembedding), on every tiny architecture."""
    model = tiny_model(family)
    adapter = ModelAdapter.from_model(model)
    lens = LogitLens(adapter)
    hidden = adapter.hidden_states(IDS)
    for l in range(1, adapter.num_layers):
        cut = _with_layers(model, adapter, range(l))
        with torch.no_grad():
            expected = cut(input_ids=IDS, use_cache=False).logits.float()
            torch.testing.assert_close(lens(hidden[l], l).float(), expected, atol=1e-4, rtol=1e-4)


def test_skipping_a_block_equals_removing_it():
    model = tiny_model("llama", num_hidden_layers=4)
    adapter = ModelAdapter.from_model(model)
    for l in range(4):
        with skip_block(adapter, l):
            ours = final_logits(adapter, IDS)
        with torch.no_grad():
            cut = _with_layers(model, adapter, [i for i in range(4) if i != l])
            removed = cut(input_ids=IDS, use_cache=False).logits.float()
        torch.testing.assert_close(ours, removed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final_logits(adapter, IDS), model(input_ids=IDS).logits.float())  # hooks removed


def test_skipping_an_identity_block_changes_nothing():
    model = tiny_model("llama")
    with torch.no_grad():  # block 1 writes nothing to the residual stream: it is the identity
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    adapter = ModelAdapter.from_model(model)
    base = adapter.hidden_states(IDS)
    with skip_block(adapter, 1):
        skipped = adapter.hidden_states(IDS)
    assert torch.equal(base, skipped)
    with skip_block(adapter, 0):  # a block that does write: the test can fail
        assert not torch.allclose(adapter.hidden_states(IDS)[1:], base[1:])
    mean = torch.full((adapter.d_model,), 0.5)
    with skip_block(adapter, 1, mean):
        torch.testing.assert_close(adapter.hidden_states(IDS)[2], base[1] + mean)


@pytest.mark.skipif(importlib.util.find_spec("nnsight") is None, reason="nnsight is not installed")
def test_patching_equals_the_same_patch_in_nnsight():
    from nnsight import NNsight

    model = tiny_model("llama")
    adapter = ModelAdapter.from_model(model)
    source, target = torch.tensor([[3, 1, 4, 1, 5]]), torch.tensor([[2, 7, 1, 8, 2, 8, 1]])
    src = adapter.hidden_states(source)
    wrapped = NNsight(model)
    for l in range(adapter.num_layers):
        def write(h, v=src[l, 0, -1]):
            h = h.clone()
            h[:, -1] = v
            return h

        with edit_residual(adapter, {l: write}):
            ours = final_logits(adapter, target)
        with wrapped.trace(target):
            wrapped.model.layers[l].input[:, -1, :] = src[l, 0, -1]
            theirs = wrapped.output.logits.save()
        torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(ours, final_logits(adapter, target)) or l == 0


def test_out_of_range_layers_are_refused():
    adapter = tiny_adapter("llama")
    with pytest.raises(LensesError, match="layer 4 is out of range.*0..3"):
        with edit_residual(adapter, {4: lambda h: h}):
            pass
    with pytest.raises(LensesError, match="block 3 is out of range.*0..2"):
        with skip_block(adapter, 3):
            pass


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", vocab_size=257, pad_token_id=256, bos_token_id=256, eos_token_id=256,
                       max_position_embeddings=1024)
    adapter = ModelAdapter.from_model(model)
    return adapter, byte_tokenizer(), {"logit": LogitLens(adapter), "tuned": random_lens(adapter)}


def _task(path, name, labels, n=6, length=None):
    rows = [{"prompt": (f"{name} {i}:" if length is None else "x" * length), "labels": labels, "answer": labels[0]}
            for i in range(n)]
    (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path / f"{name}.jsonl")


def test_patching_view_tables(tiny, tmp_path):
    adapter, tok, lenses = tiny
    tasks = read_tasks(",".join([_task(tmp_path, "a", ["a", "b"]), _task(tmp_path, "c", ["c", "d"])]), tok)
    result = patching_view(adapter, tok, lenses, tasks, num_pairs=2)
    layers, pairs = result.tables["layers"], result.tables["pairs"]
    L = adapter.num_layers
    assert len(layers) == 4 * (L + 1) and len(pairs) == 4
    assert (layers.mass_source + layers.mass_target <= 1 + 1e-6).all()
    # patching hidden[L] (the final norm's input) gives the source's own output distribution
    for row in pairs.itertuples():
        last = layers[(layers.pair == row.pair) & (layers.layer == L)].iloc[0]
        src = tasks[0] if row.source_task == "a" else tasks[1]
        p = torch.softmax(final_logits(adapter, torch.tensor([src.prompts[last.source_prompt]]))[0, -1], -1)
        assert last.mass_source == pytest.approx(float(p[src.labels].sum()), abs=1e-5)
    # a middle layer of the batched view = the same patch made alone
    row = layers[(layers.pair == 0) & (layers.layer == 1)].iloc[0]
    src = adapter.hidden_states(torch.tensor([tasks[0].prompts[row.source_prompt]]))[1, 0, -1]

    def write(h):
        h = h.clone()
        h[:, -1] = src
        return h

    with edit_residual(adapter, {1: write}):
        p = torch.softmax(final_logits(adapter, torch.tensor([tasks[1].prompts[row.target_prompt]]))[0, -1], -1)
    assert row.mass_source == pytest.approx(float(p[tasks[0].labels].sum()), abs=1e-5)
    assert row.mass_target == pytest.approx(float(p[tasks[1].labels].sum()), abs=1e-5)
    assert {"lens_switch_logit", "lens_switch_tuned", "switch_layer"} <= set(pairs.columns)
    assert "switch layer" in result.summary[0]


def test_patching_bad_input(tiny, tmp_path):
    adapter, tok, lenses = tiny
    multi = _task(tmp_path, "m", [" two tokens", " x"])
    with pytest.raises(DataError, match=r"' two tokens' \(11 tokens\).*--first-token"):
        read_task(multi, tok)
    with pytest.raises(DataError, match="share their first token"):
        read_task(multi, tok, first_token=True)
    with pytest.raises(DataError, match="share labels"):
        read_tasks(",".join([_task(tmp_path, "a", ["a", "b"]), _task(tmp_path, "b", ["b", "c"])]), tok)
    uneven = read_tasks(",".join([_task(tmp_path, "u", ["a", "b"], length=5), _task(tmp_path, "v", ["c", "d"],
                                                                                     length=7)]), tok)
    with pytest.raises(DataError, match="--positions all needs source and target prompts of the same length"):
        patching_view(adapter, tok, lenses, uneven, num_pairs=1, positions="all")
    with pytest.raises(DataError, match="does not exist"):
        read_task(str(tmp_path / "nope.jsonl"), tok)


def test_shipped_tasks_are_well_formed():
    from lenses.analysis.patching import SHIPPED, tasks_dir

    for name in SHIPPED[:-1]:
        rows = [json.loads(x) for x in (tasks_dir() / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) >= 39 and all(r["answer"] in r["labels"] for r in rows)


def test_early_exit_and_layer_skip_views(tiny):
    adapter, tok, lenses = tiny
    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 6 for i in range(30)]
    ee = early_exit_view(adapter, tok, lenses, texts, num_positions=60, seq_len=32)
    layers, adaptive = ee.tables["layers"], ee.tables["adaptive"]
    L = adapter.num_layers
    last = layers[layers.layer == L]
    assert (last.agreement == 1).all() and (last.kl.abs() < 1e-5).all() and (layers.n == 60).all()
    assert adaptive.groupby("lens").mean_exit_layer.is_monotonic_increasing.all()  # higher bar, later exit
    assert (adaptive[adaptive.threshold == adaptive.threshold.max()].agreement >= 0).all()
    skip = layer_skip_view(adapter, tok, lenses, texts, num_positions=40, seq_len=32)
    effects, out = skip.tables["effects"], skip.tables["output"]
    assert (effects.layer > effects.skipped).all() and len(out) == L
    assert len(effects) == len(lenses) * L * (L + 1) // 2
    assert (effects.kl >= 0).all() and out.accuracy.between(0, 1).all()


def test_bootstrap_interval_covers_the_mean():
    m, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert m == 2.5 and 1.0 <= lo < m < hi <= 4.0


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt"])
def test_cached_prefix_patching_equals_the_full_pass(family):
    """Patching the last position reuses the target prefix's cache for all L+1 rows; it must equal running
    every row in full."""
    from lenses.analysis.patching import _patched_outputs, _writer
    from lenses.model.intervene import last_stream

    adapter = tiny_adapter(family)
    L = adapter.num_layers
    hidden = adapter.hidden_states(torch.tensor([[3, 1, 4, 1, 5]]))[:, 0]
    target = torch.tensor([[2, 7, 1, 8, 2, 8, 1, 8]])
    cached = _patched_outputs(adapter, target, hidden, "last")
    full = last_stream(adapter, target.repeat(L + 1, 1), {l: _writer(hidden[l, -1], "last", l) for l in range(L + 1)})
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached[0], cached[L])  # the rows differ: the patches took effect
