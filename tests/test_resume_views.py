"""Resumable reading (`lenses.tracing.saved`): a view killed mid-run and resumed, on the same or another number of
processes, gives the tables of an uninterrupted run and traces no finished text again (counted)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_parallel_views import _same
from tiny_models import random_lens, run_analyze, tiny_adapter, tiny_inputs

import lenses.tracing.trace as trace_module
from lenses.tracing import saved
from lenses.tracing.trace import TraceItem, trace

ROOT = Path(__file__).resolve().parent.parent


def _items(n: int = 9) -> list[TraceItem]:
    g = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = g.integers(0, 64, size=int(g.integers(5, 12))).tolist()
        out.append(TraceItem(ids, list(range(1, len(ids) - 1)), {"next": ids[2:]}))
    return out


def _stop_after(monkeypatch, batches: int) -> None:
    """Make the model raise KeyboardInterrupt (as SIGTERM does) when batch ``batches + 1`` starts."""
    real, seen = trace_module.hidden_of_batch, [0]

    def stopping(*args, **kwargs):
        seen[0] += 1
        if seen[0] > batches:
            raise KeyboardInterrupt
        yield from real(*args, **kwargs)

    monkeypatch.setattr(trace_module, "hidden_of_batch", stopping)


def _saved_items(folder: Path) -> set[int]:
    """The items the saved parts cover, read from the files themselves."""
    out = set()
    for file in (folder / saved.PARTIAL).glob(f"*/{saved.PART}"):
        with np.load(file) as z:
            out |= set(z["item"].tolist())
    return out


def test_a_trace_resumed_after_a_kill_equals_the_whole_and_redoes_nothing(tmp_path, monkeypatch, capsys):
    adapter = tiny_adapter()
    lenses = {"logit": __import__("lenses").LogitLens(adapter), "tuned": random_lens(adapter, scale=0.2)}
    items = _items()
    whole = trace(adapter, lenses, items, batch_size=2)
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        with saved.saving(saved.Saver(tmp_path, every=0)), pytest.raises(KeyboardInterrupt):
            trace(adapter, lenses, items, batch_size=2)
    finished = _saved_items(tmp_path)
    assert 0 < len(finished) < len(items)  # two batches of two texts: four texts saved, the rest not
    assert len(finished) == 4
    with saved.saving(saved.Saver(tmp_path, resume=True, every=0)):
        again = trace(adapter, lenses, items, batch_size=2)
    assert again.attrs["texts_traced"] == len(items) - len(finished)
    assert again.attrs["texts_resumed"] == len(finished)
    assert f"resumed 4 of {len(items)} texts" in capsys.readouterr().err
    _same(whole, again, "resumed")  # top-1 ids identical; numbers within 1e-5 (other batches, other rounding)
    with saved.saving(saved.Saver(tmp_path, resume=True, every=0)):  # other lenses: another key, nothing reused
        other = trace(adapter, {"logit": lenses["logit"]}, items, batch_size=2)
    assert other.attrs["texts_resumed"] == 0 and other.attrs["texts_traced"] == len(items)


def test_saved_parts_refuse_a_run_without_resume_and_go_with_overwrite(tmp_path, capsys):
    root = tiny_inputs(tmp_path / "in")
    out = tmp_path / "out"
    args = ["--model", root / "model", "--lens", "logit", "--view", "facts",
            "--facts", root / "facts.jsonl", "--out", out, "--no-progress"]
    assert run_analyze(args, capsys).returncode == 0
    part = out / saved.PARTIAL / "k" / "part-r0-1-00000.npz"  # as a killed run leaves it
    part.parent.mkdir(parents=True)
    np.savez(part, __redone__=np.asarray(0), item=np.asarray([0]))
    r = run_analyze(args, capsys)
    assert r.returncode == 2 and "pass --resume to continue from them" in r.stderr and r.stderr.count("\n") == 1
    r = run_analyze([*args, "--resume"], capsys)  # a finished view with the same settings is kept, not redone
    assert r.returncode == 0 and "keeping the finished view(s) facts" in r.stderr, r.stderr
    r = run_analyze([*args, "--overwrite"], capsys)
    assert r.returncode == 0 and not (out / saved.PARTIAL).exists(), r.stderr


def _launch(root: Path, out: Path, n: int, port: int, stop_after: int | None = None, *extra: str):
    """``analyze.py --view facts`` on ``n`` processes; ``stop_after``: each process is interrupted when its batch
    ``stop_after + 1`` starts (through a wrapper that patches the model's runner, as a kill would stop it)."""
    args = ["--model", str(root / "model"), "--lens", f"logit,tuned:{root / 'tuned'}", "--view", "facts",
            "--facts", str(root / "many.jsonl"), "--batch-size", "2", "--save-every", "0", "--out", str(out),
            "--no-progress", *extra]
    script = str(ROOT / "analyze.py")
    if stop_after is not None:
        script = str(out.parent / "stopping.py")
        Path(script).write_text(
            "import runpy, sys\nimport lenses.tracing.trace as t\nreal, seen = t.hidden_of_batch, [0]\n"
            "def stopping(*a, **k):\n    seen[0] += 1\n    if seen[0] > " + str(stop_after) + ":\n"
            "        raise KeyboardInterrupt\n    yield from real(*a, **k)\nt.hidden_of_batch = stopping\n"
            f"sys.argv[0] = {str(ROOT / 'analyze.py')!r}\nsys.path.insert(0, {str(ROOT)!r})\n"
            f"runpy.run_path({str(ROOT / 'analyze.py')!r}, run_name='__main__')\n", encoding="utf-8")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LENSES_COMPILE": "0", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*(launcher if n > 1 else [sys.executable]), script, *args], capture_output=True,
                          text=True, env=env, timeout=900, cwd=root)


@pytest.mark.slow  # several processes: the full suite runs it
def test_a_view_killed_on_two_processes_resumes_on_one_and_on_three(tmp_path):
    from transformers import AutoModelForCausalLM

    from lenses import ModelAdapter

    root = tiny_inputs(tmp_path / "in", letters=True)
    rows = [f'{{"prompt": "Fact {i} says the quick brown", "answer": "fox jumps"}}' for i in range(24)]
    (root / "many.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    adapter = ModelAdapter.from_model(AutoModelForCausalLM.from_pretrained(root / "model"))
    random_lens(adapter, scale=0.2).save_pretrained(root / "tuned")
    whole = _launch(root, tmp_path / "whole", 1, 29581)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _launch(root, tmp_path / "killed", 2, 29582, stop_after=3)
    assert killed.returncode != 0 and killed.stderr.count("interrupted: nothing finished was lost") == 2, \
        killed.stderr[-3000:]
    finished = _saved_items(tmp_path / "killed")
    assert len(finished) == 2 * 3 * 2  # two processes, three batches of two texts each
    for n, port in ((1, 29583), (3, 29584)):
        out = tmp_path / f"resumed{n}"
        shutil.copytree(tmp_path / "killed", out)
        r = _launch(root, out, n, port, None, "--resume")
        assert r.returncode == 0, r.stderr[-3000:]
        said = re.findall(r"resumed (\d+) of (\d+) texts from the interrupted run; traced the other (\d+)", r.stderr)
        assert said == [(str(len(finished)), "24", str(24 - len(finished)))], r.stderr[-2000:]
        assert not (out / saved.PARTIAL).exists()  # the view's tables hold them now
        for name in sorted(p.name for p in (tmp_path / "whole").glob("facts_*.csv")):
            _same(pd.read_csv(tmp_path / "whole" / name), pd.read_csv(out / name), f"{n} processes: {name}")


def test_a_setting_an_earlier_version_did_not_record_counts_as_its_default(tmp_path, capsys):
    """A view recorded before a setting existed (here --states, and --seed) had that setting's default: rerun
    with the default it is the same view; with another value it differs and needs --overwrite."""
    import json

    root = tiny_inputs(tmp_path / "in")
    out = tmp_path / "out"
    args = ["--model", root / "model", "--lens", "logit", "--view", "facts", "--facts", root / "facts.jsonl",
            "--out", out, "--no-progress"]
    assert run_analyze(args, capsys).returncode == 0
    report = json.loads((out / "report.json").read_text())
    for v in report["views"]:
        v["settings"].pop("states"), v["settings"].pop("seed")
    (out / "report.json").write_text(json.dumps(report))
    r = run_analyze([*args, "--seed", "1"], capsys)
    assert r.returncode == 2 and "seed not recorded there" in r.stderr, r.stderr
    assert run_analyze(args, capsys).returncode == 0  # the defaults: the same settings
