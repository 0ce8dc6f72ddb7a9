"""Training math against a float64 autograd reference, and the training loop end to end."""

import signal

import pandas as pd
import pytest
import torch
from tiny_models import as_interrupted, random_lens, tiny_adapter, tiny_model

from lenses import LensesError, LogitLens, ModelAdapter, TunedLens, engine
from lenses.engine import dtypes, kernels
from lenses.jobs import train as train_module
from lenses.jobs.train import TrainConfig, lens_kl_backward, train
from lenses.tracing.evaluate import evaluate


def _reference(family, lens, ids, weights):
    """Per-layer KL and weight gradients in float64 with plain autograd, layer by layer."""
    model = tiny_model(family).double()
    adapter = ModelAdapter.from_model(model)
    W = lens.weight.detach().double().requires_grad_()
    B = lens.bias.detach().double().requires_grad_()
    hidden = adapter.hidden_states(ids).flatten(1, 2)
    logp = torch.log_softmax(engine.decode(adapter, hidden[-1]), -1)
    kls, total = [], 0
    for layer in range(adapter.num_layers):
        t = hidden[layer] + hidden[layer] @ W[layer].T + B[layer]
        logq = torch.log_softmax(engine.decode(adapter, t), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        kls.append(kl)
        total = total + (weights.double() * kl).mean()
    total.backward()
    return torch.stack(kls), W.grad, B.grad


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "gemma2"])
def test_kl_and_gradients_match_float64_reference(family, eager_kl):
    adapter = tiny_adapter(family)
    lens = random_lens(adapter)
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    weights = torch.rand(14, generator=torch.Generator().manual_seed(3)) + 0.5
    hidden = adapter.hidden_states(ids).flatten(1, 2)
    # 14 positions: teacher blocks of 6+6+2, chunks of 4 inside them (4+2, 4+2, 2)
    kl = lens_kl_backward(lens, hidden, weights, torch.float32, chunk_rows=4 * adapter.num_layers, teacher_positions=6)
    ref_kl, ref_gw, ref_gb = _reference(family, lens, ids, weights)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lens.weight.grad.double(), ref_gw, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(lens.bias.grad.double(), ref_gb, rtol=1e-4, atol=1e-7)


def test_softcapped_gradients_match_reference(eager_kl, monkeypatch):
    """Gemma 2 with a cap small enough to bend the logits: the chain rule through tanh is right."""
    import tiny_models

    family = "gemma2"
    monkeypatch.setitem(tiny_models.FAMILIES, family, {**tiny_models.FAMILIES[family], "final_logit_softcapping": 0.1})
    adapter = tiny_adapter(family)
    lens = random_lens(adapter)
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    weights = torch.ones(10)
    hidden = adapter.hidden_states(ids).flatten(1, 2)
    kl = lens_kl_backward(lens, hidden, weights, torch.float32, chunk_rows=3 * adapter.num_layers)  # 10 = 3+3+3+1
    ref_kl, ref_gw, _ = _reference(family, lens, ids, weights)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lens.weight.grad.double(), ref_gw, rtol=1e-4, atol=1e-7)


def test_compiled_kernel_matches_eager(monkeypatch):
    """The torch.compile'd element-wise pass gives the eager result (or we fell back to eager)."""
    adapter = tiny_adapter("llama")
    lens = random_lens(adapter)
    hidden = adapter.hidden_states(torch.randint(1, 96, (2, 6))).flatten(1, 2)
    monkeypatch.setattr(kernels.KERNELS["kl"], "compiled", kernels._kl_and_dz)
    kl_eager = lens_kl_backward(lens, hidden, None, torch.float32, chunk_rows=12)
    g_eager = lens.weight.grad.clone()
    lens.weight.grad = lens.bias.grad = None
    monkeypatch.setattr(kernels.KERNELS["kl"], "compiled", None)
    monkeypatch.setenv("LENSES_COMPILE", "1")
    kl_comp = lens_kl_backward(lens, hidden, None, torch.float32, chunk_rows=12)
    torch.testing.assert_close(kl_comp, kl_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lens.weight.grad, g_eager, rtol=1e-5, atol=1e-8)


def test_bfloat16_matmuls_stay_within_the_stated_tolerance_of_float32():
    """The README's promise for `--compute-dtype bfloat16`: per-layer KL within 1% and weight
    gradients within cosine 0.999 of the float32 computation (compiled kernel, as users run it)."""
    adapter = tiny_adapter("llama")
    lens = random_lens(adapter)
    hidden = adapter.hidden_states(torch.randint(1, 96, (4, 16),
                                                 generator=torch.Generator().manual_seed(5))).flatten(1, 2)
    kl32 = lens_kl_backward(lens, hidden, None, torch.float32)
    g32 = lens.weight.grad.clone()
    lens.weight.grad = lens.bias.grad = None
    kl16 = lens_kl_backward(lens, hidden, None, torch.bfloat16)
    torch.testing.assert_close(kl16.mean(1), kl32.mean(1), rtol=1e-2, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity(lens.weight.grad.flatten(), g32.flatten(), dim=0)
    assert cos > 0.999, cos


def test_per_layer_kl_matches_reference(eager_kl):
    adapter = tiny_adapter("qwen2")
    lens = random_lens(adapter)
    blocks = torch.randint(1, 96, (5, 6), generator=torch.Generator().manual_seed(4))
    got = evaluate(adapter, {"logit": LogitLens(adapter), "tuned": lens}, blocks, batch_size=2, chunk_rows=7,
                   teacher_positions=5).kl  # 12 positions per batch: teacher blocks 5+5+2
    ref_tuned, _, _ = _reference("qwen2", lens, blocks, torch.ones(30))
    torch.testing.assert_close(got["tuned"], ref_tuned.mean(1).detach(), rtol=1e-4, atol=1e-6)
    zero = TunedLens.for_model(adapter)
    ref_logit, _, _ = _reference("qwen2", zero, blocks, torch.ones(30))
    torch.testing.assert_close(got["logit"], ref_logit.mean(1).detach(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- the loop


TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n\n") * 6


def _cfg(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    base = dict(
        corpus=str(corpus), out=str(tmp_path / "run"), seq_len=16, batch_size=4, steps=6, optimizer="adam",
        lr=1e-2, checkpoint_every=2, compute_dtype="float32", progress=False, max_eval_tokens=64,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_heldout_kl_and_writes_outputs(tmp_path, char_tokenizer, eager_kl):
    model = tiny_model("llama")
    cfg = _cfg(tmp_path, steps=30)
    result = train(cfg, model=model, tokenizer=char_tokenizer)
    lens = result.lens
    out = tmp_path / "run"
    for name in ("config.json", "translators.safetensors", "training_log.csv", "eval.csv", "checkpoint.pt",
                 "eval_top1_buckets.csv", "token_frequencies.safetensors"):
        assert (out / name).exists(), name
    log = pd.read_csv(out / "training_log.csv")
    assert list(log.columns) == ["step", "layer", "kl"] and len(log) == 30 * 3
    table = pd.read_csv(out / "eval.csv").pivot(index="layer", columns="lens", values="kl_nats")
    assert (table["tuned"] < table["logit"]).all()
    assert lens.config["training"]["train_tokens"] == 30 * 4 * 16
    # what train() returns is what it wrote
    pd.testing.assert_frame_equal(result.eval, pd.read_csv(out / "eval.csv"), check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(result.log, log, check_exact=False, rtol=1e-12)


def test_existing_run_needs_resume(tmp_path, char_tokenizer, eager_kl):
    model = tiny_model("llama")
    train(_cfg(tmp_path, steps=2), model=model, tokenizer=char_tokenizer)
    with pytest.raises(LensesError, match="finished result.*--overwrite"):
        train(_cfg(tmp_path, steps=2), model=model, tokenizer=char_tokenizer)
    with pytest.raises(LensesError, match="nothing to resume"):  # --resume over a finished lens trains nothing
        train(_cfg(tmp_path, steps=2, resume=True), model=model, tokenizer=char_tokenizer)
    as_interrupted(tmp_path / "run")
    with pytest.raises(LensesError, match="interrupted.*--resume"):
        train(_cfg(tmp_path, steps=2), model=model, tokenizer=char_tokenizer)


def _interrupt_at(monkeypatch, at_step, how):
    real = train_module.batch_indices

    def fake(step, *a):
        if step == at_step:
            if how == "hard":
                raise KeyboardInterrupt  # like SIGKILL: nothing saved at this point
            signal.raise_signal(signal.SIGINT)  # like Ctrl-C: stop after this step
        return real(step, *a)

    monkeypatch.setattr(train_module, "batch_indices", fake)


@pytest.mark.parametrize("how", ["soft", "hard"])
def test_resume_is_bit_identical(tmp_path, char_tokenizer, monkeypatch, how, eager_kl):
    model = tiny_model("llama")
    straight = train(_cfg(tmp_path / "a"), model=model, tokenizer=char_tokenizer)

    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3, how)
        with pytest.raises((LensesError, KeyboardInterrupt)):
            train(_cfg(tmp_path / "b"), model=model, tokenizer=char_tokenizer)
    resumed = train(_cfg(tmp_path / "b", resume=True), model=model, tokenizer=char_tokenizer).lens
    straight = straight.lens
    assert torch.equal(straight.weight, resumed.weight) and torch.equal(straight.bias, resumed.bias)
    log_a = pd.read_csv(tmp_path / "a" / "run" / "training_log.csv")
    log_b = pd.read_csv(tmp_path / "b" / "run" / "training_log.csv")
    pd.testing.assert_frame_equal(log_a, log_b)


def test_resume_refuses_changed_settings(tmp_path, char_tokenizer, eager_kl):
    model = tiny_model("llama")
    train(_cfg(tmp_path, steps=2), model=model, tokenizer=char_tokenizer)
    as_interrupted(tmp_path / "run")
    with pytest.raises(LensesError, match="seq_len"):
        train(_cfg(tmp_path, steps=2, seq_len=8, resume=True), model=model, tokenizer=char_tokenizer)


def test_non_finite_values_stop_training_with_advice(tmp_path, char_tokenizer, eager_kl, monkeypatch):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("inf"))  # like an fp16 overflow
    with pytest.raises(LensesError, match="NaN/inf logits.*--model-dtype"):
        train(_cfg(tmp_path / "a", steps=2), model=model, tokenizer=char_tokenizer)
    # past the up-front check, the training loop itself refuses non-finite gradients
    monkeypatch.setattr(ModelAdapter, "verify", lambda self: None)
    with pytest.raises(LensesError, match="non-finite gradient at step 0.*--model-dtype"):
        train(_cfg(tmp_path / "b", steps=2), model=model, tokenizer=char_tokenizer)


@pytest.mark.slow  # several processes or a kill and resume: the full suite runs it
def test_sigkilled_process_resumes_bit_identically(tmp_path, char_tokenizer, eager_kl):
    """A real training process is killed with SIGKILL after a checkpoint; --resume finishes the run."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from safetensors.torch import load_file

    straight = train(_cfg(tmp_path / "a", steps=12), model=tiny_model("llama"), tokenizer=char_tokenizer).lens
    cfg = _cfg(tmp_path / "b", steps=12)
    kw = {k: v for k, v in cfg.__dict__.items() if k != "variant"}
    worker = [sys.executable, str(Path(__file__).parent / "train_worker.py"), json.dumps(kw)]
    env = {**os.environ, "LENSES_COMPILE": "0", "LENSES_TEST_STEP_DELAY": "0.5"}
    proc = subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = Path(cfg.out) / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.7)  # now mid-way through a later step
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, proc.stderr.read()[-2000:]
    assert torch.load(ckpt, weights_only=True)["step"] < 12  # it really was cut short
    done = subprocess.run(worker + ["resume"], env={**env, "LENSES_TEST_STEP_DELAY": "0"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = load_file(str(Path(cfg.out) / "translators.safetensors"))
    assert torch.equal(resumed["weight"], straight.weight.detach()) and torch.equal(resumed["bias"],
                                                                                    straight.bias.detach())


def test_part_paths_reach_the_adapter(tmp_path, char_tokenizer, eager_kl):
    """--layers/--final-norm/--unembed (TrainConfig fields) are used, not ignored."""
    with pytest.raises(LensesError, match="model.nope"):
        train(_cfg(tmp_path, steps=1, final_norm="model.nope"), model=tiny_model("llama"), tokenizer=char_tokenizer)
    lens = train(_cfg(tmp_path / "ok", steps=1, layers="model.layers", final_norm="model.norm", unembed="lm_head"),
                 model=tiny_model("llama"), tokenizer=char_tokenizer).lens
    assert lens.num_layers == 3


def test_auto_dtype_on_a_cpu_without_avx512_is_float32_without_timing(monkeypatch, tmp_path):
    """An AVX2-only x86 CPU emulates bfloat16 matmuls (~30 s for the timing's own product here under AVX2):
    `compute_dtype("auto")` answers float32 from the CPU's capability, never timing bfloat16 there; with
    AVX-512 it still measures both (and a measured answer is cached)."""
    monkeypatch.setenv("LENSES_CACHE", str(tmp_path))
    monkeypatch.setattr(dtypes.platform, "machine", lambda: "x86_64")
    timed = []
    monkeypatch.setattr(dtypes, "_time_matmul", lambda dtype, device: timed.append(dtype) or
                        (1.0 if dtype == torch.float32 else 0.5))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert engine.compute_dtype("auto") == torch.float32 and timed == []
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert engine.compute_dtype("auto") == torch.bfloat16 and timed == [torch.float32, torch.bfloat16]
    assert engine.compute_dtype("auto") == torch.bfloat16 and len(timed) == 2  # cached
