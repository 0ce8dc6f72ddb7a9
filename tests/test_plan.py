"""The memory plan (`lenses plan`): sizes from the config alone, checked against closed forms and the
model's own parameter count; the CLI's JSON, its errors, and training refusing a plan that does not fit.
The plan against measured peaks of real runs is benchmarks/plan_check.py (docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model, tiny_model

from lenses.base.errors import LensesError
from lenses.base.options import parse_devices, parse_max_memory, parse_size
from lenses.jobs.plan import PlanOptions, components, model_shapes, plan

CONFIGS = Path(__file__).parent / "data" / "configs"
ROOT = Path(__file__).parent.parent


def llama_params(d, inter, layers, kv_dim, vocab, tied):
    """Closed form: per block q, o (d x d), k, v (d x kv_dim), gate, up, down (d x I), two norms; plus the
    embedding, the unembedding unless tied, and the final norm."""
    block = 2 * d * d + 2 * d * kv_dim + 3 * d * inter + 2 * d
    return layers * block + vocab * d * (1 if tied else 2) + d


@pytest.mark.parametrize("name, d, inter, layers, kv_dim, tied", [
    ("llama-3.2-1b", 2048, 8192, 16, 512, True),
    ("llama-3.1-8b", 4096, 14336, 32, 1024, False),
    ("llama-3.3-70b", 8192, 28672, 80, 1024, False),
])
def test_shapes_match_the_closed_form_of_llama(name, d, inter, layers, kv_dim, tied):
    s = model_shapes(CONFIGS / f"{name}.json")
    assert (s.num_layers, s.d_model, s.vocab_size, s.intermediate) == (layers, d, 128256, inter)
    assert s.params == llama_params(d, inter, layers, kv_dim, 128256, tied)
    p = plan(s, PlanOptions(model_dtype="bfloat16", devices="1x80GiB"))
    assert p.weight_bytes == 2 * s.params + 2 * s.buffer_elems
    assert p.lens_bytes == layers * (d * d + d) * 4  # float32 translators and biases


def test_the_70b_figures_of_the_issue():
    """Llama-3.3-70B: 141 GB of bfloat16 weights, a 21.5 GB tuned lens (float32)."""
    p = plan(model_shapes(CONFIGS / "llama-3.3-70b.json"), PlanOptions(model_dtype="bfloat16", devices="8x80GiB"))
    assert round(p.weight_bytes / 1e9) == 141 and round(p.lens_bytes / 1e9, 1) == 21.5
    assert not p.fits and any("--fsdp" in a for a in p.advice)  # data parallel: the whole model on each GPU
    sharded = plan(model_shapes(CONFIGS / "llama-3.3-70b.json"),
                   PlanOptions(model_dtype="bfloat16", devices="8x80GiB", fsdp=True, optimizer="adam"))
    assert sharded.fits and max(sharded.peak_bytes) < 80 * 2**30


def test_shapes_of_a_built_model_agree_with_its_parameters():
    model = tiny_model("gpt2")
    s = model_shapes(config=model.config)
    assert s.params == sum(p.numel() for p in model.parameters())
    assert s.num_layers == model.config.n_layer and s.d_model == model.config.n_embd


def test_fsdp_halves_the_lens_state_per_process():
    s = model_shapes(CONFIGS / "llama-3.2-1b.json")
    one = components(s, PlanOptions(optimizer="adam", device_type="cpu"), 1)
    two = components(s, PlanOptions(optimizer="adam", device_type="cpu", fsdp=True), 2)
    for k in ("lens", "gradients", "optimizer"):
        assert two[k] == one[k] // 2
    assert one["optimizer"] == 2 * one["lens"]  # Adam's two moments
    block = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048  # closed form of one block
    # half of the 16 blocks leave each process; two gathered ones come in; embeddings and head stay whole
    assert one["weights"] - two["weights"] == (8 * block - 2 * block) * 4
    assert two["hidden states"] == one["hidden states"] // 2


def test_advice_names_an_option_that_fits():
    s = model_shapes(CONFIGS / "llama-3.1-8b.json")
    p = plan(s, PlanOptions(job="train", batch_size=64, seq_len=2048, devices="1x80GiB", model_dtype="bfloat16"))
    assert not p.fits
    tip = next(a for a in p.advice if a.startswith("--batch-size"))
    fixed = plan(s, PlanOptions(job="train", batch_size=int(tip.split()[1]), seq_len=2048, devices="1x80GiB",
                                model_dtype="bfloat16"))
    assert fixed.fits


def test_sizes_and_device_strings():
    assert parse_size("80GiB") == 80 * 2**30 and parse_size("70GB") == 70 * 10**9
    assert parse_size("1.5TiB") == 1.5 * 2**40
    assert parse_devices("8x80GiB") == [80 * 2**30] * 8 and parse_devices("80GiB,40GiB") == [80 * 2**30, 40 * 2**30]
    assert parse_max_memory("0=70GiB,1=70GiB,cpu=200GiB") == {0: 70 * 2**30, 1: 70 * 2**30, "cpu": 200 * 2**30}
    for bad in ("8xbanana", "x80GiB", "80", "0x80GiB"):
        with pytest.raises(LensesError, match="--devices"):
            parse_devices(bad)
    for bad in ("0:70GiB", "gpu0=70GiB", "0=lots"):
        with pytest.raises(LensesError):
            parse_max_memory(bad)


def _lenses(*args):
    """``lenses ARGS`` in this process (the console script's own entry): (status, stdout, stderr)."""
    import contextlib
    import io

    from lenses.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def test_cli_json_has_the_fields_and_exits_zero_either_way():
    for devices, fits in (("8x80GiB", True), ("1x24GiB", False)):
        run = _lenses("plan", str(CONFIGS / "llama-3.1-8b.json"), "--train", "--model-dtype", "bfloat16", "--fsdp",
                      "--devices", devices, "--batch-size", "8", "--seq-len", "256", "--json")
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert out["fits"] is fits and len(out["peak_bytes"]) == len(parse_devices(devices))
        shapes = model_shapes(CONFIGS / "llama-3.1-8b.json")
        assert out["weight_bytes"] == 2 * (shapes.params + shapes.buffer_elems)
        assert out["lens_bytes"] == 32 * (4096 * 4096 + 4096) * 4
        assert fits or out["advice"]


def test_cli_bad_input_is_one_line_and_status_2(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    for args in (["--devices", "8xbanana"], [str(tmp_path)], [str(tmp_path / "missing-folder/x")],
                 ["--batch-size", "0"], ["--lens", "foo"], ["--trace", "--lens", "logit,jlens"]):
        run = _lenses("plan", *args)
        assert run.returncode == 2, (args, run.stderr)
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ")


def test_training_refuses_a_plan_that_does_not_fit_before_loading(tmp_path):
    model = save_tiny_model(tmp_path / "m")
    run = _lenses("train", "--model", str(model), "--out", str(tmp_path / "run"), "--batch-size", "4000000",
                  "--seq-len", "64", "--steps", "1")
    assert run.returncode == 2, run.stderr
    assert "memory plan" in run.stderr and "--batch-size" in run.stderr and "GiB" in run.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was claimed or loaded


def test_trace_batch_size_follows_the_memory_rule():
    from types import SimpleNamespace

    from tiny_models import tiny_adapter

    from lenses.jobs.plan import this_machine_cpu, trace_batch_size

    assert trace_batch_size(tiny_adapter("llama")) == 16  # a tiny model: the cap
    budget = this_machine_cpu() // 10

    def fake(d, layers):
        weight = torch.empty(0, dtype=torch.float32)
        config = SimpleNamespace(intermediate_size=4 * d)
        return SimpleNamespace(num_layers=layers, d_model=d, unembed=SimpleNamespace(weight=weight),
                               model=SimpleNamespace(config=config), device=torch.device("cpu"))

    for d, layers in ((4096, 32), (8192, 80), (2048, 16)):
        per_text = (layers + 1) * 256 * d * 4 + 3 * 256 * 4 * d * 4  # closed form, float32, 256 tokens
        assert trace_batch_size(fake(d, layers)) == max(1, min(16, budget // per_text))
    assert trace_batch_size(fake(65536, 400)) == 1  # never 0


def test_a_sharded_read_of_405b_holds_a_sixteenth_of_the_blocks_and_every_lens_whole():
    """--trace --fsdp (the views under torchrun --fsdp): each of 16 devices holds 1/16 of the 126 blocks plus two
    gathered ones, the embeddings and unembedding whole (closed form from the config), and each lens whole."""
    s = model_shapes(CONFIGS / "llama-3.1-405b.json")
    d, V, L = 16384, 128256, 126
    assert s.num_layers == L and s.d_model == d and s.vocab_size == V
    o = PlanOptions(job="trace", model_dtype="bfloat16", devices="16x80GiB", fsdp=True, device_type="cuda",
                    lens="logit")
    p = plan(s, o)
    blocks = L * s.block_params * 2
    rope = s.buffer_elems * 2  # the rotary buffer, whole
    assert p.per_device[0]["weights"] == 2 * V * d * 2 + blocks // 16 + 2 * s.block_params * 2 + d * 2 + rope
    assert p.fits and len(p.per_device) == 16
    tuned = plan(s, PlanOptions(**{**o.__dict__, "lens": "logit,tuned"}))
    assert tuned.per_device[0]["lens"] == L * (d * d + d) * 4  # whole on every process: does not fit 80 GiB
    assert not tuned.fits and "every process holds each lens whole" in tuned.advice[0]
