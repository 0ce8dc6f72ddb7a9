"""The Jacobian-lens fit as a long job: `lenses fit`, kill -9 and --resume,
two processes (torchrun, gloo on CPU) against one, early stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_models import as_interrupted, save_tiny_model, two_loopback_nodes

from lenses import JacobianLens, load_lens

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LENSES_COMPILE": "0", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("jfit")
    model = save_tiny_model(base / "model", "llama")
    corpus = base / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"Document {i} says something new about lenses and layers. " * 14)
    return model, corpus


def _cli(model, corpus, out, *extra, background=False):
    cmd = [sys.executable, "-m", "lenses", "fit", "--model", str(model), "--corpus",
           str(corpus), "--out", str(out), "--num-prompts", "8", "--seq-len", "48", "--eval-tokens", "256",
           "--no-progress", *extra]
    if background:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # several processes or a kill and resume: the full suite runs it
def test_kill_then_resume_equals_uninterrupted(setup, tmp_path):
    model, corpus = setup
    _cli(model, corpus, tmp_path / "full")
    full = load_lens(tmp_path / "full")
    assert isinstance(full, JacobianLens) and full.n_prompts == 8
    # kill -9 once a few prompts are checkpointed (slowed down so the kill lands mid-fit)
    proc = _cli(model, corpus, tmp_path / "cut", "--dim-batch", "1", background=True)
    ckpt = tmp_path / "cut" / "jacobian_checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["n_done"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the fit finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(ckpt, weights_only=True)["n_done"]
    assert 2 <= done < 8
    # a changed recipe is refused on resume, naming the setting
    bad = subprocess.run([sys.executable, "-m", "lenses", "fit", "--model", str(model),
                          "--corpus", str(corpus), "--out", str(tmp_path / "cut"), "--num-prompts", "8", "--seq-len",
                          "40", "--resume", "--no-progress"], env=ENV, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "seq_len" in bad.stderr, bad.stderr
    _cli(model, corpus, tmp_path / "cut", "--resume", "--dim-batch", "1")  # dim_batch changes no number
    cut = load_lens(tmp_path / "cut")
    assert cut.n_prompts == 8
    torch.testing.assert_close(cut.matrices, full.matrices, atol=0, rtol=0)  # the same sums in the same order
    log = pd.read_csv(tmp_path / "cut" / "convergence.csv")
    assert log.n_done.tolist() == list(range(1, 9))
    assert log.seconds.is_monotonic_increasing  # wall time adds up across the killed and the resumed session
    # the published file is what TransformerLens and the reference read
    raw = torch.load(tmp_path / "full" / "jacobian_lens.pt", weights_only=True)
    assert raw["n_prompts"] == 8 and sorted(raw["J"]) == [0, 1]
    # --resume over the finished fit is refused (nothing to resume), and so is the tuned-lens trainer there
    again = subprocess.run([sys.executable, "-m", "lenses", "fit", "--model",
                            str(model), "--corpus", str(corpus), "--out", str(tmp_path / "cut"), "--num-prompts", "8",
                            "--seq-len", "48", "--resume", "--no-progress"], env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 2 and "nothing to resume" in again.stderr, again.stderr
    tuned = subprocess.run([sys.executable, str(ROOT / "train_probes.py"), "--model", str(model), "--corpus",
                            str(corpus), "--out", str(tmp_path / "cut"), "--resume", "--no-progress"], env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert tuned.returncode == 2 and "jacobian run" in tuned.stderr, tuned.stderr


@pytest.mark.slow  # several processes or a kill and resume: the full suite runs it
def test_a_checkpoint_finishes_elsewhere(setup, tmp_path):
    """A fit's checkpoint carried to another machine (the model file at another path, another device) is
    finished there with --resume: the model is identified by its fingerprint, not by where its file lies."""
    import shutil

    model, corpus = setup
    _cli(model, corpus, tmp_path / "run", "--num-prompts", "3")
    fitted = load_lens(tmp_path / "run")
    as_interrupted(tmp_path / "run")  # the folder carried elsewhere holds the checkpoint (and its mark)
    moved = shutil.copytree(model, tmp_path / "elsewhere")
    _cli(moved, corpus, tmp_path / "run", "--num-prompts", "3", "--resume", "--device", "cpu")
    torch.testing.assert_close(load_lens(tmp_path / "run").matrices, fitted.matrices, atol=0, rtol=0)
    other = save_tiny_model(tmp_path / "other", "llama", seed=5)  # same shapes, other weights: refused
    as_interrupted(tmp_path / "run")
    bad = subprocess.run([sys.executable, "-m", "lenses", "fit", "--model", str(other),
                          "--corpus", str(corpus), "--out", str(tmp_path / "run"), "--num-prompts", "3", "--seq-len",
                          "48", "--resume", "--no-progress"], env=ENV, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "fingerprint" in bad.stderr


@pytest.mark.slow  # several processes or a kill and resume: the full suite runs it
def test_two_processes_match_one(setup, tmp_path):
    model, corpus = setup
    _cli(model, corpus, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "lenses", "fit", "--model", str(model), "--corpus", str(corpus),
           "--out", str(tmp_path / "two"), "--num-prompts", "7", "--seq-len", "48", "--eval-tokens", "256",
           "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _cli(model, corpus, tmp_path / "one7", "--num-prompts", "7")
    one, two = load_lens(tmp_path / "one7"), load_lens(tmp_path / "two")
    assert two.n_prompts == 7  # 4 + 3: the shares need not be equal
    # the float32 sums of the two shares add up to the one-process sum, to float32 rounding
    ranks = [torch.load(tmp_path / "two" / f"jacobian_checkpoint.rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = torch.load(tmp_path / "one7" / "jacobian_checkpoint.pt", weights_only=True)
    assert ranks[0]["n_done"] + ranks[1]["n_done"] == single["n_done"] == 7
    for k, total in single["jacobian_sum"].items():
        both = ranks[0]["jacobian_sum"][k] + ranks[1]["jacobian_sum"][k]
        torch.testing.assert_close(both, total, atol=1e-5 * total.abs().max().item(), rtol=1e-5)
    # the saved lenses (float16 matrices): equal up to one float16 rounding step where a float32 sum
    # lands on the other side of a float16 rounding boundary (the CPU's kernels decide which)
    torch.testing.assert_close(two.matrices.float(), one.matrices.float(), atol=1e-6, rtol=2**-10)


@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_early_stop(setup, tmp_path):
    model, corpus = setup
    out = _cli(model, corpus, tmp_path / "tol", "--tol", "1.0", "--min-prompts", "3")
    assert "converged" in out.stdout
    assert load_lens(tmp_path / "tol").n_prompts == 3


@pytest.mark.slow  # several processes or a kill and resume: the full suite runs it
def test_three_lenses_through_the_views(setup, tmp_path):
    """logit, tuned and Jacobian lenses side by side in the depth views, early exit and the agreement view;
    the Jacobian lens's layer 0 (no matrix) is NaN, never the logit lens's numbers."""
    model, corpus = setup
    jl = tmp_path / "jl"
    _cli(model, corpus, jl, "--num-prompts", "3")
    tl = tmp_path / "tl"
    proc = subprocess.run([sys.executable, str(ROOT / "train_probes.py"), "--model", str(model), "--corpus",
                           str(corpus), "--out", str(tl), "--steps", "3", "--seq-len", "32", "--batch-size", "2",
                           "--no-progress", "--compute-dtype", "float32"], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "out"
    for view in ("frequency", "early-exit", "agreement"):
        proc = subprocess.run([sys.executable, str(ROOT / "analyze.py"), "--model", str(model), "--corpus", str(corpus),
                               "--lens", f"tuned:{tl},jacobian:{jl}", "--view", view, "--num-positions", "40",
                               "--out", str(out), "--no-progress", "--freq-prompts", "blocks"],
                              env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    freq = pd.read_csv(out / "frequency_layers.csv")
    assert set(freq.lens) == {"logit", "tuned", "jacobian"}
    j0 = freq[(freq.lens == "jacobian") & (freq.layer == 0)]
    assert j0.share.isna().all() and freq[(freq.lens == "logit") & (freq.layer == 0)].share.notna().all()
    assert freq[(freq.lens == "jacobian") & (freq.layer == 1)].share.notna().all()
    exits = pd.read_csv(out / "early-exit_layers.csv")
    assert exits[(exits.lens == "jacobian") & (exits.layer == 0)][["agreement", "accuracy", "kl"]].isna().all().all()
    agree = pd.read_csv(out / "agreement_layers.csv")
    assert len(agree.groupby(["lens_a", "lens_b"])) == 3
    last = agree[agree.layer == agree.layer.max()]
    assert (last.top1_agreement == 1).all() and (last.sym_kl.abs() < 1e-4).all()  # layer L: the model's output
    assert agree[(agree.layer == 0) & (agree.lens_b == "jacobian")].top1_agreement.isna().all()
    assert (out / "agreement.png").exists()
    assert "agreement" in (out / "index.html").read_text()


def _torchrun_fit(model, corpus, out, n, *extra, port=29562, background=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port),
           "-m", "lenses", "fit", "--model", str(model), "--corpus", str(corpus),
           "--out", str(out), "--num-prompts", "7", "--seq-len", "48", "--eval-tokens", "256", "--no-progress",
           "--device", "cpu", "--fsdp", *extra]
    if background:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _kill_all(marker: str) -> None:
    """SIGKILL every process whose command line holds ``marker``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace") and int(cmdline.parent.name) != os.getpid():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # gone meanwhile


def _shard_sums(folder) -> tuple[int, dict]:
    """The sums of a sharded fit put back together from its rank files (rows + their sums)."""
    files = sorted((Path(folder) / "jacobian_checkpoint.shards").glob("jacobian_shard.rank*.pt"))
    parts = [torch.load(f, weights_only=True) for f in files]
    n_layers, _, d = parts[0]["lenses_sum_rows"].shape
    whole = torch.zeros(n_layers, d, d)
    for p in parts:
        whole[:, p["lenses_rows"]] = p["lenses_sum_rows"]
    assert {p["n_done"] for p in parts} == {parts[0]["n_done"]}  # every shard is of the same moment
    return parts[0]["n_done"], whole


@pytest.mark.slow  # several processes: the full suite runs it
def test_two_sharded_processes_match_one(setup, tmp_path):
    """--fsdp: the blocks and the running sums are sharded; each process holds half of the sums, and the
    lens equals one plain process's (same prompts)."""
    model, corpus = setup
    _cli(model, corpus, tmp_path / "one", "--num-prompts", "7")
    proc = _torchrun_fit(model, corpus, tmp_path / "two", 2)
    held = re.findall(r"fsdp: process (\d) of 2 held ([\d.]+) KiB of the sums' ([\d.]+) KiB", proc.stdout)
    assert sorted(r for r, _, _ in held) == ["0", "1"], proc.stdout[-2000:]
    d, n_layers = 32, 2  # the tiny llama: hidden states 1..L-1 of L = 3
    for _, mine, whole in held:
        assert float(whole) * 1024 == n_layers * d * d * 4
        assert float(mine) == pytest.approx(float(whole) / 2)
    n, sums = _shard_sums(tmp_path / "two")
    single = torch.load(tmp_path / "one" / "jacobian_checkpoint.pt", weights_only=True)
    assert n == single["n_done"] == 7
    for j, k in enumerate(sorted(single["jacobian_sum"])):
        total = single["jacobian_sum"][k]
        torch.testing.assert_close(sums[j], total, atol=1e-5 * total.abs().max().item(), rtol=1e-5)
    one, two = load_lens(tmp_path / "one"), load_lens(tmp_path / "two")
    assert two.n_prompts == 7
    torch.testing.assert_close(two.matrices.float(), one.matrices.float(), atol=1e-6, rtol=2**-10)
    # a sharded fit resumes only sharded
    as_interrupted(tmp_path / "two", keep=())
    plain = subprocess.run([sys.executable, "-m", "lenses", "fit", "--model",
                            str(model), "--corpus", str(corpus), "--out", str(tmp_path / "two"), "--num-prompts", "7",
                            "--seq-len", "48", "--resume", "--no-progress"], env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert plain.returncode == 2 and "--fsdp" in plain.stderr, plain.stderr


@pytest.mark.slow  # several processes, a kill and a resume: the full suite runs it
def test_sharded_fit_killed_then_resumed_equals_uninterrupted(setup, tmp_path):
    model, corpus = setup
    _torchrun_fit(model, corpus, tmp_path / "full", 2, "--dim-batch", "1", port=29563)
    proc = _torchrun_fit(model, corpus, tmp_path / "cut", 2, "--dim-batch", "1", port=29564, background=True)
    shards = tmp_path / "cut" / "jacobian_checkpoint.shards"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if shards.exists() and _shard_sums(tmp_path / "cut")[0] >= 2:
                break
        except (FileNotFoundError, RuntimeError, EOFError, AssertionError):
            pass  # the folder is being swapped
        time.sleep(0.05)
    assert proc.poll() is None, "the fit finished before it could be killed"
    _kill_all(str(tmp_path / "cut"))  # torchrun and both workers (they run in process groups of their own)
    proc.wait()
    assert 2 <= _shard_sums(tmp_path / "cut")[0] < 7
    _torchrun_fit(model, corpus, tmp_path / "cut", 2, "--dim-batch", "1", "--resume", port=29565)
    full, cut = load_lens(tmp_path / "full"), load_lens(tmp_path / "cut")
    assert cut.n_prompts == 7
    torch.testing.assert_close(cut.matrices, full.matrices, atol=0, rtol=0)  # the same sums in the same order
    log = pd.read_csv(tmp_path / "cut" / "convergence.csv")
    assert log.n_done.tolist() == [2, 4, 6, 7]  # one row per round of two prompts


@pytest.mark.slow  # two node agents: the full suite runs it
def test_two_nodes_on_loopback_fit_the_one_process_lens(setup, tmp_path):
    """The two-node launch of docs/training.md for the fit, as two node agents on this machine meeting over
    127.0.0.1 (one process each, --fsdp): the lens of one plain process on the same prompts."""
    model, corpus = setup
    _cli(model, corpus, tmp_path / "one", "--num-prompts", "7")

    args = ["-m", "lenses", "fit", "--model", model, "--corpus", corpus, "--out", tmp_path / "nodes", "--num-prompts",
            "7", "--seq-len", "48", "--eval-tokens", "256", "--no-progress", "--device", "cpu", "--fsdp"]
    nodes = two_loopback_nodes(args, 29566, None, ENV)
    assert all(rc == 0 for rc, _, _ in nodes), [err[-2000:] for _, _, err in nodes]
    one, nodes = load_lens(tmp_path / "one"), load_lens(tmp_path / "nodes")
    assert nodes.n_prompts == 7
    torch.testing.assert_close(nodes.matrices.float(), one.matrices.float(), atol=1e-6, rtol=2**-10)
