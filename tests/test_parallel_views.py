"""The views under torchrun (data parallel, gloo on CPU): the texts of every traced view are split over the
processes, balanced by tokens, and the first process writes the folder; the tables equal one process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_models import random_lens, tiny_inputs, two_loopback_nodes

from lenses import ModelAdapter
from lenses.tracing.parallel import shares

ROOT = Path(__file__).resolve().parent.parent
VIEWS = ("all", "calibration", "representation", "layer-skip")  # the depth views and calibration trace;
# representation splits its prompts, layer-skip its skipped blocks


def test_shares_are_balanced_by_tokens_and_cover_every_text_once():
    lengths = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    parts = shares(lengths, 2)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    assert sorted(sum(lengths[i] for i in p) for p in parts) == [100, 100]  # not 6 texts against 5
    assert shares([5, 5], 3)[2] == []  # more processes than texts: one has none


def _run(root: Path, out: Path, n: int, view: str, port: int, *extra: str) -> subprocess.CompletedProcess:
    args = [str(ROOT / "analyze.py"), "--model", str(root / "model"), "--corpus", str(root / "corpus.txt"), "--lens",
            f"logit,tuned:{root / 'tuned'}", "--view", view, "--facts", str(root / "facts.jsonl"), "--mcq",
            str(root / "mcq.csv"), "--num-positions", "40", "--freq-prompts", "blocks", "--num-questions", "8",
            "--batch-size", "2", "--skip-positions", "16", "--num-prompts", "6", "--prompt-tokens", "24", "--out",
            str(out), "--no-progress", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LENSES_COMPILE": "0", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd if n > 1 else [sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=root)


def _same(a: pd.DataFrame, b: pd.DataFrame, name: str) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b), name
    for col in a.columns:
        if pd.api.types.is_numeric_dtype(a[col]) and not col.endswith("_id"):
            np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), atol=1e-5, rtol=1e-5,
                                       equal_nan=True, err_msg=f"{name}: {col}")
        else:
            assert a[col].astype(str).tolist() == b[col].astype(str).tolist(), f"{name}: {col}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, Path]:
    """The inputs (a tiny model, its tuned lens, facts, MCQ) and the folder one process wrote."""
    from transformers import AutoModelForCausalLM

    tmp_path = tmp_path_factory.mktemp("parallel")
    root = tiny_inputs(tmp_path / "in", letters=True)
    rows = [f'{{"prompt": "Fact {i} says the quick brown", "answer": "fox"}}' for i in range(6)]
    (root / "facts.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    adapter = ModelAdapter.from_model(AutoModelForCausalLM.from_pretrained(root / "model"))
    random_lens(adapter, scale=0.2).save_pretrained(root / "tuned")
    for view in VIEWS:
        one = _run(root, tmp_path / "one", 1, view, 29571)
        assert one.returncode == 0, one.stderr[-3000:]
    return root, tmp_path / "one"


@pytest.mark.slow  # several processes: the full suite runs it
@pytest.mark.parametrize("fsdp", [False, True], ids=["whole-model", "fsdp"])
def test_two_processes_write_the_tables_of_one(one_process, tmp_path, fsdp):
    root, one = one_process
    runs = [_run(root, tmp_path / "two", 2, view, 29572 + fsdp, *(["--fsdp"] if fsdp else [])) for view in VIEWS]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    two = runs[0]
    tables = sorted(p.name for p in one.glob("*.csv"))
    assert len(tables) >= 6 and tables == sorted(p.name for p in (tmp_path / "two").glob("*.csv"))
    for name in tables:
        _same(pd.read_csv(one / name), pd.read_csv(tmp_path / "two" / name), name)
    assert two.stdout.count("== facts") == 1  # one process reports
    import re

    took = re.findall(r"tracing: process (\d) of 2 takes (\d+) of (\d+) texts", two.stderr)
    assert {r for r, _, _ in took} == {"0", "1"}, two.stderr[-2000:]
    for n in {total for _, _, total in took}:  # every trace: the two shares make the whole
        shares_of_it = [int(k) for _, k, total in took if total == n]
        assert sum(shares_of_it) % int(n) == 0 and all(0 < k < int(n) for k in shares_of_it)
    said = two.stdout + two.stderr
    held = re.findall(r"fsdp: process (\d) of 2 holds ([\d.]+ \w+) of the blocks' ([\d.]+ \w+)", said)
    if fsdp:  # each process holds half of every block
        assert sorted(r for r, _, _ in held) == ["0", "1"], (two.stdout + two.stderr)[-2000:]
        for _, mine, whole in held:
            assert _bytes(mine) == pytest.approx(_bytes(whole) / 2, rel=0.02)
    else:
        assert not held


def _bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def test_fsdp_without_a_launcher_or_for_the_grid_is_one_line(tmp_path, capsys, monkeypatch):
    from tiny_models import run_analyze

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    r = run_analyze(["--view", "facts", "--fsdp", "--out", tmp_path / "o"], capsys)
    assert r.returncode == 2 and "torchrun --nproc_per_node N analyze.py ... --fsdp" in r.stderr, r.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = run_analyze(["--fsdp", "--out", tmp_path / "o"], capsys)
    assert r.returncode == 2 and "the grid of --prompt reads one" in r.stderr, r.stderr


@pytest.mark.slow  # two node agents: the full suite runs it
def test_two_nodes_on_loopback_write_the_tables_of_one(one_process, tmp_path):
    """The two-node launch of docs/analysis.md, as two node agents on this machine meeting over 127.0.0.1 (one
    process each, blocks sharded): the depth views' tables of one process."""
    root, one = one_process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LENSES_COMPILE": "0", "TOKENIZERS_PARALLELISM": "false"}
    args = [str(ROOT / "analyze.py"), "--model", str(root / "model"), "--corpus", str(root / "corpus.txt"), "--lens",
            f"logit,tuned:{root / 'tuned'}", "--view", "all", "--facts", str(root / "facts.jsonl"), "--mcq",
            str(root / "mcq.csv"), "--num-positions", "40", "--freq-prompts", "blocks", "--num-questions", "8",
            "--batch-size", "2", "--out", str(tmp_path / "nodes"), "--no-progress", "--fsdp"]

    nodes = two_loopback_nodes(args, 29576, root, env)
    assert all(rc == 0 for rc, _, _ in nodes), [err[-2000:] for _, _, err in nodes]
    written = sorted(p.name for p in (tmp_path / "nodes").glob("*.csv"))
    assert len(written) >= 6
    for name in written:
        _same(pd.read_csv(one / name), pd.read_csv(tmp_path / "nodes" / name), name)
