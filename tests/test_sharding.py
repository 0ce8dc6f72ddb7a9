"""Sharded training (--fsdp, PyTorch FSDP2 on gloo/CPU): N processes give one process's lens, each holds
about 1/N of it, and sharded checkpoints resume exactly on another number of processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model, two_loopback_nodes

from lenses import LensesError
from lenses.base.outdir import _alive
from lenses.jobs.train import TrainConfig, train
from lenses.text.frequency import FrequencyVariant

HERE = Path(__file__).parent
TEXT = ("A small corpus: the quick brown fox jumps over the lazy dog, then rests. " * 30 + "\n\n") * 6
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
LAYERS = 4  # an even depth: two processes hold two layers of translators each
pytestmark = [pytest.mark.slow, pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")]


def _kw(tmp_path, name, **extra):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return dict(corpus=str(corpus), out=str(tmp_path / name), seq_len=16, batch_size=4, steps=6, optimizer="adam",
                lr=1e-2, checkpoint_every=2, compute_dtype="float32", progress=False, max_eval_tokens=64,
                plan_check=False) | extra


def _torchrun(n: int, kw: dict, resume: bool = False, env: dict | None = None, port: int = 29541):
    cmd = [TORCHRUN, "--nproc_per_node", str(n), "--master_port", str(port), str(HERE / "train_worker.py"),
           json.dumps({**kw, "fsdp": True, "model_layers": LAYERS})] + (["resume"] if resume else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LENSES_COMPILE": "0", **(env or {})})


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    """The uninterrupted two-process run every stopped, killed or resumed run is compared with: run once for the
    module (its lens does not depend on where it was written)."""
    root = tmp_path_factory.mktemp("sharded")
    run = _torchrun(2, _kw(root, "whole"))
    assert run.returncode == 0, run.stderr[-3000:]
    return _lens(root / "whole")


def _lens(folder) -> dict:
    return load_file(str(Path(folder) / "translators.safetensors"))


def _close(a: dict, b: dict):
    assert a["weight"].abs().max() > 1e-3  # it trained
    for k in ("weight", "bias"):
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", [{}, {"topk": 3, "keep_prob": 0.5, "token": "next"}],
                         ids=["baseline", "subsampled"])
def test_two_sharded_processes_match_one_plain_process(tmp_path, char_tokenizer, variant):
    one = _kw(tmp_path, "one")
    train(TrainConfig(**{**one, "variant": FrequencyVariant(**variant)}),
          model=tiny_model("llama", num_hidden_layers=LAYERS), tokenizer=char_tokenizer)
    run = _torchrun(2, _kw(tmp_path, "two", variant=variant))
    assert run.returncode == 0, run.stderr[-3000:]
    _close(_lens(tmp_path / "one"), _lens(tmp_path / "two"))
    # each process held half of the lens and of the optimizer state (Adam: two moments of its half)
    size = r"([\d.]+ [KMG]?i?B)"
    held = re.findall(rf"fsdp: process (\d) of 2 held {size} of the lens's {size}, .*? and {size} of optimizer state",
                      run.stdout)
    assert len(held) == 2, run.stdout[-2000:]
    d = 32
    whole = LAYERS * (d * d + d) * 4  # float32 translators and biases
    for _, mine, total, optim in held:
        assert _bytes(total) == pytest.approx(whole, rel=0.01)
        assert _bytes(mine) == pytest.approx(whole / 2, rel=0.01)
        assert _bytes(optim) == pytest.approx(whole, rel=0.01)  # Adam's two moments of its half


def _bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


@pytest.mark.parametrize("first, then", [(2, 2), (2, 1), (1, 2)])
def test_sharded_checkpoint_resumes_on_another_number_of_processes(tmp_path, first, then, whole):
    kw = _kw(tmp_path, "cut")
    stopped = _torchrun(first, kw, env={"LENSES_TEST_STOP_AT": "3"})
    assert stopped.returncode != 0 and "interrupted after step 3" in stopped.stderr
    assert (tmp_path / "cut" / "checkpoint.dcp" / ".metadata").exists()
    assert not (tmp_path / "cut" / "translators.safetensors").exists()
    resumed = _torchrun(then, kw, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _close(whole, _lens(tmp_path / "cut"))


def test_kill_9_mid_run_then_resume(tmp_path, whole):
    kw = _kw(tmp_path, "killed", checkpoint_every=1)
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", "29542", str(HERE / "train_worker.py"),
           json.dumps({**kw, "fsdp": True, "model_layers": LAYERS})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LENSES_COMPILE": "0", "LENSES_TEST_STEP_DELAY": "1.5"}
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = tmp_path / "killed" / "checkpoint.dcp" / "meta.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not (meta.exists() and torch.load(meta, weights_only=False)["step"] >= 2):
        time.sleep(0.3)
    for pid in [*_children(proc.pid), proc.pid]:  # the workers (torchrun starts them in sessions of their own)
        os.kill(pid, signal.SIGKILL)  # and the launcher, at once, mid-run
    proc.wait()
    holder = json.loads((tmp_path / "killed" / ".lenses-lock").read_text())["pid"]
    while _alive(holder) and time.time() < deadline:  # the workers die a moment after their launcher
        time.sleep(0.1)
    assert not (tmp_path / "killed" / "translators.safetensors").exists()
    resumed = _torchrun(2, kw, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _close(whole, _lens(tmp_path / "killed"))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_fsdp_without_a_launcher_says_the_command(tmp_path, char_tokenizer, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LensesError, match="torchrun --nproc_per_node N"):
        train(TrainConfig(**_kw(tmp_path, "x", fsdp=True)), model=tiny_model("llama"), tokenizer=char_tokenizer)
    assert not (tmp_path / "x").exists()  # refused before the folder was claimed


def test_two_nodes_on_loopback_give_the_two_process_lens(tmp_path, whole):
    """The documented two-node command (docs/training.md), run as two node agents on this machine that meet over
    127.0.0.1 (c10d rendezvous), one process each: the same lens as two processes on one node."""
    kw = json.dumps({**_kw(tmp_path, "nodes"), "fsdp": True, "model_layers": LAYERS})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LENSES_COMPILE": "0"}

    nodes = two_loopback_nodes([HERE / "train_worker.py", kw], 29561, HERE, env, launcher=[TORCHRUN])
    assert all(rc == 0 for rc, _, _ in nodes), [err[-2000:] for _, _, err in nodes]
    for k in ("weight", "bias"):
        torch.testing.assert_close(_lens(tmp_path / "nodes")[k], whole[k], rtol=1e-4, atol=1e-5)
