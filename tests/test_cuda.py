"""The same numbers on a GPU as on the CPU (skipped without CUDA; run on a lent accelerator).

Each check here once failed on an H100 and passed on the CPU: the adapter's structure checks compared
states from passes of different batch shapes at float32 rounding, and a fitted Jacobian lens stayed on
the CPU while the model decoded on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import random_lens, save_tiny_model, tiny_adapter, tiny_model

from lenses import JacobianLens, LogitLens, ModelAdapter, load_lens
from lenses.jobs.jlens_estimator import fit_prompts
from lenses.tracing.evaluate import evaluate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).parent.parent


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt_neox", "qwen3"])
def test_adapter_and_lenses_agree_with_the_cpu(family):
    cpu = tiny_adapter(family)
    gpu = ModelAdapter.from_model(tiny_model(family).cuda())  # verify() runs on the GPU here
    ids = torch.randint(1, 90, (2, 24))
    hc, hg = cpu.hidden_states(ids), gpu.hidden_states(ids.cuda())
    assert hg.device.type == "cuda" and _rel(hg, hc) < 1e-4
    tuned_c = random_lens(cpu)
    tuned_g = random_lens(gpu)
    for layer in (0, 1, cpu.num_layers):
        for lc, lg in ((LogitLens(cpu), LogitLens(gpu)), (tuned_c, tuned_g)):
            assert _rel(lg(hg[layer], layer), lc(hc[layer], layer)) < 1e-3


def test_jacobian_fit_on_the_gpu_equals_the_cpu_and_evaluates_there():
    cpu = ModelAdapter.from_model(tiny_model("llama").double())
    gpu = ModelAdapter.from_model(tiny_model("llama").cuda())
    prompts = [torch.randint(1, 90, (40,)) for _ in range(3)]
    jc = fit_prompts(cpu, prompts, skip_first=4)
    jg = fit_prompts(gpu, prompts, skip_first=4)
    assert jg.matrices.device.type == "cuda"  # lives where the model decodes
    assert _rel(jg.matrices, jc.matrices) < 1e-4
    kl = evaluate(gpu, {"logit": LogitLens(gpu), "jacobian": jg}, torch.randint(1, 90, (2, 32))).table()
    jkl = kl[kl.lens == "jacobian"].set_index("layer").kl_nats
    assert jkl.drop(0).notna().all() and jkl.drop(0).ge(0).all() and len(jkl) == gpu.num_layers


def test_a_fit_started_on_the_gpu_finishes_on_the_cpu_from_another_path(tmp_path):
    """How the shipped J-lens was made: 1,000 prompts fitted on an H100, the checkpoint copied back and the
    run finished (lens, evaluation) on a CPU machine where the model file lies elsewhere."""
    import shutil

    model = save_tiny_model(tmp_path / "model", "llama")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"d{i}.txt").write_text(f"Document {i} tells about lenses and layers. " * 16)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, model, device, *extra):
        cmd = [sys.executable, "-m", "lenses", "fit", "--model", str(model),
               "--corpus", str(corpus), "--out", str(out), "--seq-len", "48", "--eval-tokens", "256",
               "--no-progress", "--device", device, "--num-prompts", "3", *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "gpu", model, "cuda")
    fitted = load_lens(tmp_path / "gpu")
    for f in (tmp_path / "gpu").iterdir():  # keep only the checkpoint, as if copied back from the GPU machine
        if f.name != "jacobian_checkpoint.pt" and not f.name.startswith("."):
            f.unlink()
    moved = shutil.copytree(model, tmp_path / "elsewhere")
    run(tmp_path / "gpu", moved, "cpu", "--resume")
    run(tmp_path / "cpu", model, "cpu")
    again, cpu = load_lens(tmp_path / "gpu"), load_lens(tmp_path / "cpu")
    assert isinstance(again, JacobianLens) and again.n_prompts == cpu.n_prompts == 3
    assert torch.equal(again.matrices, fitted.matrices)  # the same sums, only finished elsewhere
    assert _rel(again.matrices, cpu.matrices) < 1e-3  # float16 files: GPU vs CPU rounding stays far below
