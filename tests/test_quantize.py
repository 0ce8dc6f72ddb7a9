"""Quantized models (`--quantize int8|int4`, torchao weight-only): read like any model, the logit lens at the
last layer equals the quantized model's own logits, lenses trace and train on them, bad input is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import run_analyze, tiny_inputs, tiny_model

from lenses import LensesError, LogitLens, ModelAdapter, TunedLens, engine
from lenses.model.loading import ModelOptions, load_model, quantize_weights
from lenses.tracing.trace import TraceItem, trace

pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logit_lens_at_the_last_layer_is_the_quantized_models_output(family, scheme):
    model = tiny_model(family, vocab_size=300)
    ids = torch.randint(1, 290, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        quantize_weights(model, scheme)
        after = model(ids).logits
    assert type(model.lm_head.weight) is not torch.nn.Parameter  # the weights really are quantized
    assert 0 < (after - before).abs().max() < 0.2 * before.abs().max()  # changed, and only by rounding
    adapter = ModelAdapter.from_model(model)  # verify(): the adapter's own checks pass on the quantized model
    h = adapter.hidden_states(ids)
    torch.testing.assert_close(engine.decode(adapter, h[-1]), after, rtol=1e-5, atol=1e-5)
    # every lens traces it; the bfloat16 re-scored decode keeps float32's top-1
    lenses = {"logit": LogitLens(adapter), "tuned": TunedLens.for_model(adapter)}
    items = [TraceItem(ids[0].tolist(), list(range(20)), {"next": ids[0, 1:].tolist() + [1]})]
    a, b = trace(adapter, lenses, items), trace(adapter, lenses, items, dtype=torch.bfloat16)
    assert (a.top1_id == b.top1_id).all() and len(a) == 2 * (adapter.num_layers + 1) * 20
    assert adapter.fingerprint()["unembed_probe"] != ModelAdapter.from_model(
        tiny_model(family, vocab_size=300)).fingerprint()["unembed_probe"]  # the quantized model is another model


def test_a_tuned_lens_trains_on_a_quantized_model(tmp_path):
    from lenses.jobs.train import TrainConfig, train

    inputs = tiny_inputs(tmp_path)
    model, tok = load_model(inputs / "model", quantize="int8")
    result = train(TrainConfig(corpus=str(inputs / "corpus.txt"), out=str(tmp_path / "run"), seq_len=16,
                               batch_size=4, steps=8, lr=3e-2, progress=False, max_eval_tokens=256,
                               plan_check=False, quantize="int8"), model=model, tokenizer=tok)
    kl = result.eval.pivot(index="layer", columns="lens", values="kl_nats")
    inner = kl.index < kl.index.max()
    assert (kl.tuned[inner] < kl.logit[inner]).all()


def test_bad_quantize_input_is_refused_with_one_line(tmp_path, capsys):
    with pytest.raises(LensesError, match="int8 or int4"):
        quantize_weights(tiny_model("llama"), "int3")
    with pytest.raises(Exception, match="int8"):
        ModelOptions(quantize="fp4")
    inputs = tiny_inputs(tmp_path)
    run = run_analyze(["--model", inputs / "model", "--quantize", "int2", "--out", tmp_path / "out"], capsys)
    assert run.returncode == 2 and "int8" in run.stderr and len(run.stderr.strip().splitlines()) <= 2, run.stderr
