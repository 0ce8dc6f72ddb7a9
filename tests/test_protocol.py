"""The Lens protocol is the only seam, and the redesign changed no result.

- A third lens defined here, in a few lines, runs through tracing, a depth view, held-out
  evaluation and save/load with no library change.
- Results pinned from the commit before the redesign (tests/fixtures/pinned_before_redesign.json,
  made by that commit's code on the same tiny model): training, held-out KL and a trace.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import random_lens, tiny_adapter, tiny_model

from lenses import Lens, LensesError, LogitLens, load_lens, register_kind
from lenses.analysis.frequency import frequency_view
from lenses.jobs.train import TrainConfig, train
from lenses.tracing.evaluate import evaluate
from lenses.tracing.trace import TraceItem, trace

PINNED = json.loads((Path(__file__).parent / "fixtures" / "pinned_before_redesign.json").read_text())


class RotatedLens(Lens):  # the toy third lens: a fixed random rotation in front of the logit lens
    kind = "test-rotation"

    def __init__(self, num_layers, d_model, config=None):
        super().__init__(num_layers, d_model, config)
        q = torch.linalg.qr(torch.randn(d_model, d_model, generator=torch.Generator().manual_seed(7)))[0]
        self.register_buffer("rotation", q)

    def transform(self, h, layer):
        return h @ self.rotation.T


@pytest.fixture
def tiny():
    adapter = tiny_adapter("llama")
    return adapter, {"logit": LogitLens(adapter), "rotated": RotatedLens.for_model(adapter)}


def _rotated_logits(adapter, lens, h, layer):
    """Independent float64 computation: rotate (except at the last layer), final norm, lm_head."""
    model = adapter.model.double()
    h = h.double() if layer == adapter.num_layers else h.double() @ lens.rotation.double().T
    out = model.lm_head(model.model.norm(h))
    adapter.model.float()
    return out


def test_third_lens_traces_evaluates_and_round_trips(tiny, tmp_path, eager_kl, char_tokenizer):
    adapter, lenses = tiny
    rot = lenses["rotated"]
    ids = char_tokenizer("A third lens, read through every path.").input_ids
    df = trace(adapter, lenses, [TraceItem(ids, [3, 9], {"next": [ids[4], ids[10]]})])
    hidden = adapter.hidden_states(torch.tensor([ids]))[:, 0]
    for layer in (0, 2, adapter.num_layers):
        want = _rotated_logits(adapter, rot, hidden[layer, [3, 9]], layer)
        got = df[(df.lens == "rotated") & (df.layer == layer)]
        np.testing.assert_array_equal(got.top1_id, want.argmax(-1).numpy())
        np.testing.assert_allclose(got.prob_next, torch.softmax(want, -1)[[0, 1], [ids[4], ids[10]]], rtol=1e-4)
    # the lens really differs from the logit lens below the last layer, and equals it at the last
    t = df.pivot_table(index=["layer", "position"], columns="lens", values="top1_prob")
    assert not np.allclose(t.loc[0, "rotated"], t.loc[0, "logit"])
    np.testing.assert_allclose(t.loc[adapter.num_layers, "rotated"], t.loc[adapter.num_layers, "logit"], rtol=1e-6)
    # a depth view
    texts = [" ".join(f"word{i % 7} and the {i}" for i in range(j, j + 60)) for j in range(12)]
    view = frequency_view(adapter, char_tokenizer, lenses, texts, num_positions=20, seq_len=64, prompts="blocks")
    layers = view.tables["layers"]
    assert set(layers.lens) == {"logit", "rotated"} and np.allclose(layers.groupby(["lens", "layer"]).share.sum(), 1)
    # held-out evaluation against a float64 KL
    blocks = torch.tensor([ids[:12], ids[12:24]])
    held = evaluate(adapter, {"rotated": rot}, blocks, batch_size=1, chunk_rows=7 * adapter.num_layers)
    kl, per_block = held.kl["rotated"], held.block_kl["rotated"]
    h = adapter.hidden_states(blocks).flatten(1, 2)
    logp = torch.log_softmax(_rotated_logits(adapter, rot, h[-1], adapter.num_layers), -1)
    table = held.table().set_index("layer")
    for layer in range(adapter.num_layers):
        logq = torch.log_softmax(_rotated_logits(adapter, rot, h[layer], layer), -1)
        ref = (logp.exp() * (logp - logq)).sum(-1)  # per position; block b holds positions 12b .. 12b + 11
        torch.testing.assert_close(kl[layer].double(), ref.mean(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(per_block[:, layer], ref.view(2, 12).mean(1), rtol=1e-4, atol=1e-6)
        row = table.loc[layer]  # two blocks: the bootstrap interval spans the two block means
        assert row.kl_low <= row.kl_nats <= row.kl_high and row.kl_low >= float(per_block[:, layer].min()) - 1e-9
    # save / load by kind, checked against the model: by its own class, and by kind once registered
    rot.save_pretrained(tmp_path / "rot")
    back = RotatedLens.from_pretrained(tmp_path / "rot", model=adapter)
    assert type(back) is RotatedLens and torch.equal(back.rotation, rot.rotation)
    with pytest.raises(LensesError, match="register"):  # kinds are registered explicitly, not by import
        load_lens(tmp_path / "rot", model=adapter)
    register_kind(RotatedLens)
    back = load_lens(tmp_path / "rot", model=adapter)
    assert type(back) is RotatedLens and torch.equal(back.rotation, rot.rotation)


def test_training_reproduces_the_commit_before_the_redesign(tmp_path, char_tokenizer, eager_kl):
    import pandas as pd

    text = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n\n") * 6
    (tmp_path / "c.txt").write_text(text)
    cfg = TrainConfig(corpus=str(tmp_path / "c.txt"), out=str(tmp_path / "run"), seq_len=16, batch_size=4, steps=6,
                      optimizer="adam", lr=1e-2, checkpoint_every=2, compute_dtype="float32", progress=False,
                      max_eval_tokens=64)
    result = train(cfg, model=tiny_model("llama"), tokenizer=char_tokenizer)
    np.testing.assert_allclose(result.lens.weight.detach().double().flatten()[::17], PINNED["train_weight"],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.lens.bias.detach().double().flatten(), PINNED["train_bias"], rtol=1e-5, atol=1e-7)
    assert result.eval.lens.tolist() == PINNED["eval_lens"]
    # KLs near 1e-3 summed from O(1) float32 terms: another CPU's kernels move them by ~1e-7 absolute
    np.testing.assert_allclose(result.eval.kl_nats, PINNED["eval_kl"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.log.kl, PINNED["log_kl"], rtol=1e-5, atol=1e-6)
    assert isinstance(result.log, pd.DataFrame)


def test_trace_reproduces_the_commit_before_the_redesign(char_tokenizer, eager_kl):
    adapter = tiny_adapter("llama")
    ids = char_tokenizer("The capital of France is Paris, and the quick fox.").input_ids
    items = [TraceItem(ids, [5, 10, 20, len(ids) - 2], {"next": [ids[6], ids[11], ids[21], ids[-1]]})]
    df = trace(adapter, {"logit": LogitLens(adapter), "tuned": random_lens(adapter)}, items)
    pinned = PINNED["trace"]
    for col in ("lens", "layer", "position", "top1_id", "rank_next"):
        assert df[col].tolist() == pinned[col], col
    for col in ("top1_prob", "entropy", "prob_next"):
        np.testing.assert_allclose(df[col], pinned[col], rtol=1e-6, err_msg=col)
    # the KL terms are now summed in the training kernel's order: float32 rounding of O(1) terms, ~2e-7
    np.testing.assert_allclose(df.kl, pinned["kl"], rtol=0, atol=1e-6)


class ScaleLens(Lens):  # a toy *trainable* lens written outside the library: a learned gain per layer and unit
    kind = "test-scale"

    def __init__(self, num_layers, d_model, config=None):
        super().__init__(num_layers, d_model, config)
        self.gain = torch.nn.Parameter(torch.zeros(num_layers, d_model))  # zero: starts as the logit lens

    def transform(self, h, layer):
        return h * (1 + self.gain[layer])

    def transform_stack(self, h):
        return h * (1 + self.gain[: h.shape[0]].view(h.shape[0], *([1] * (h.dim() - 2)), -1))


def test_a_new_trainable_lens_is_one_class(tmp_path, char_tokenizer, eager_kl, monkeypatch):
    """The training state is generic over a lens's parameters: the same loop, checkpoint and resume train,
    save and reload a lens class the library has never seen."""
    text = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n\n") * 6
    (tmp_path / "c.txt").write_text(text)
    model = tiny_model("llama")
    cfg = TrainConfig(corpus=str(tmp_path / "c.txt"), out=str(tmp_path / "run"), seq_len=16, batch_size=4, steps=8,
                      optimizer="adam", lr=5e-2, checkpoint_every=2, compute_dtype="float32", progress=False,
                      max_eval_tokens=64)
    result = train(cfg, model=model, tokenizer=char_tokenizer, lens_class=ScaleLens)
    assert isinstance(result.lens, ScaleLens) and result.lens.gain.abs().sum() > 0
    kl = result.eval.pivot(index="layer", columns="lens", values="kl_nats")
    assert (kl["test-scale"] < kl["logit"]).sum() >= len(kl) - 1  # it learned something at (almost) every layer
    back = ScaleLens.from_pretrained(tmp_path / "run", model=model)
    torch.testing.assert_close(back.gain, result.lens.gain.cpu())
    # killed at step 5 (its last checkpoint is step 4) and resumed: the same lens, bit for bit
    import lenses.jobs.train as train_module

    real = train_module.batch_indices

    def killed_at_5(step, *a):
        if step == 5:
            raise KeyboardInterrupt
        return real(step, *a)

    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    monkeypatch.setattr(train_module, "batch_indices", killed_at_5)
    with pytest.raises(KeyboardInterrupt):
        train(cut, model=model, tokenizer=char_tokenizer, lens_class=ScaleLens)
    monkeypatch.setattr(train_module, "batch_indices", real)
    again = train(dataclasses.replace(cut, resume=True), model=model, tokenizer=char_tokenizer, lens_class=ScaleLens)
    assert torch.equal(again.lens.gain, result.lens.gain)
    with pytest.raises(LensesError, match="no trainable parameters"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "rot")), model=model, tokenizer=char_tokenizer,
              lens_class=RotatedLens)
