"""Data-parallel training with `accelerate launch` (2 processes, gloo on CPU) matches one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model

from lenses.jobs.train import TrainConfig, train
from lenses.text.frequency import FrequencyVariant

HERE = Path(__file__).parent
TEXT = ("A small corpus: the quick brown fox jumps over the lazy dog, then rests. " * 30 + "\n\n") * 6
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")


def _kw(tmp_path, name, variant):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return dict(corpus=str(corpus), out=str(tmp_path / name), seq_len=16, batch_size=4, steps=5, optimizer="adam",
                lr=1e-2, checkpoint_every=2, compute_dtype="float32", progress=False, max_eval_tokens=64,
                variant=variant)


@pytest.mark.slow  # two processes: the full suite runs it
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
@pytest.mark.parametrize("variant", [pytest.param({}, id="baseline", marks=pytest.mark.ci),
                                     pytest.param({"topk": 3, "keep_prob": 0.5, "token": "next"}, id="subsampled")])
def test_two_processes_match_one(tmp_path, char_tokenizer, eager_kl, variant):
    one = _kw(tmp_path, "one", variant)
    train(TrainConfig(**{**one, "variant": FrequencyVariant(**variant)}), model=tiny_model("llama"),
          tokenizer=char_tokenizer)
    two = _kw(tmp_path, "two", variant)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LENSES_COMPILE": "0"}
    proc = subprocess.run(
        [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "--main_process_port", "29517", str(HERE / "train_worker.py"),
         json.dumps(two)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "translators.safetensors"))
    b = load_file(str(tmp_path / "two" / "translators.safetensors"))
    assert a["weight"].abs().max() > 1e-3  # it trained
    torch.testing.assert_close(b["weight"], a["weight"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b["bias"], a["bias"], rtol=1e-4, atol=1e-5)
    log_a = pd.read_csv(tmp_path / "one" / "training_log.csv")
    log_b = pd.read_csv(tmp_path / "two" / "training_log.csv")
    pd.testing.assert_series_equal(log_a.kl, log_b.kl, rtol=1e-4)
    # each process ran half of every batch of 4 through the model (the main one also the held-out blocks)
    for rank in (0, 1):
        seen = json.loads((tmp_path / "two" / f"seen-{rank}.json").read_text())
        assert seen[1:6] == [2] * 5  # seen[0]: the adapter's self-check
    # only the main process wrote, once
    assert json.loads((tmp_path / "two" / "config.json").read_text())["training"]["train_tokens"] == 5 * 4 * 16


def test_batch_must_split_evenly(tmp_path, char_tokenizer, monkeypatch):
    from lenses import LensesError
    from lenses.jobs.distributed import DataParallel

    monkeypatch.setattr(DataParallel, "from_env", classmethod(lambda cls, device=None: cls(0, 3)))
    kw = _kw(tmp_path, "x", {})
    with pytest.raises(LensesError, match="multiple of 3"):
        train(TrainConfig(**{**kw, "variant": FrequencyVariant()}), model=tiny_model("llama"), tokenizer=char_tokenizer)
