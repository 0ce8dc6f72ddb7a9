"""Nothing lost, nothing silent: output folders, resume checks, signals, and one-line errors.

Every CLI run here goes through `run_cli`, the one place where errors become ``error: ...`` and
exit status 2; an exception escaping it fails the test (that would be a traceback for a user).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import TEXT, as_interrupted, tiny_inputs

from lenses.base.options import run_cli
from lenses.commands import analyze
from lenses.commands import train as train_probes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder with a real tokenizer, a corpus, facts and MCQ files (`tiny_models.tiny_inputs`)."""
    return tiny_inputs(tmp_path_factory.mktemp("inputs"))


def train_args(files, out, *extra):
    return ["--model", str(files / "model"), "--corpus", str(files / "corpus.txt"), "--no-progress", "--steps", "4",
            "--seq-len", "16", "--batch-size", "2", "--max-eval-tokens", "32", "--checkpoint-every", "2",
            "--compute-dtype", "float32", "--optimizer", "adam", "--lr", "0.01", "--out", str(out), *extra]


def cli(main, argv, capsys) -> tuple[int, str]:
    rc = run_cli(main, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc == 2:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
    return rc, err


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- silent loss


def test_out_pointing_at_the_model_folder_changes_nothing(files, capsys, eager_kl):
    before = snapshot(files / "model")
    rc, err = cli(train_probes.main, train_args(files, files / "model"), capsys)
    assert rc == 2 and "not empty" in err and "config.json" in err
    rc, err = cli(analyze.main, ["--model", str(files / "model"), "--lens", "logit", "--out", str(files / "model")],
                  capsys)
    assert rc == 2 and "not empty" in err
    assert snapshot(files / "model") == before


def test_finished_lens_needs_overwrite(files, tmp_path, capsys, eager_kl):
    out = tmp_path / "run"
    assert cli(train_probes.main, train_args(files, out), capsys)[0] == 0
    lens = (out / "translators.safetensors").read_bytes()
    rc, err = cli(train_probes.main, train_args(files, out, "--steps", "5"), capsys)
    assert rc == 2 and "finished result" in err and "--overwrite" in err
    assert (out / "translators.safetensors").read_bytes() == lens
    assert cli(train_probes.main, train_args(files, out, "--steps", "5", "--overwrite"), capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 5
    # an analysis folder is not a training folder, and the other way round
    rc, err = cli(analyze.main, ["--model", str(files / "model"), "--lens", "logit", "--out", str(out)], capsys)
    assert rc == 2 and "train run" in err


def test_a_second_run_into_the_same_folder_is_refused(files, tmp_path, capsys, eager_kl):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lenses-out").write_text('{"kind": "train"}')
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lenses-lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        rc, err = cli(train_probes.main, train_args(files, out), capsys)
        assert rc == 2 and f"process {sleeper.pid}" in err
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder died: its lock is taken over with a notice, and a stale temporary file is removed
    (out / ".checkpoint.pt.abc123.lenses.tmp").write_bytes(b"half a checkpoint")
    rc, err = cli(train_probes.main, train_args(files, out), capsys)
    assert rc == 0 and "taking over the lock" in err and "removed .checkpoint.pt.abc123.lenses.tmp" in err
    assert not (out / ".lenses-lock").exists() and not list(out.glob(".*.tmp"))


@pytest.mark.slow  # several processes or a kill and resume: the full suite runs it
def test_two_concurrent_processes_one_wins(files, tmp_path):
    """Two real processes start into the same --out: exactly one trains, the other is refused."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(Path(__file__).parent.parent / "train_probes.py"), *train_args(files, out)]
    env = {**os.environ, "LENSES_COMPILE": "0"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [rc for rc, _ in results] == [0, 2], results
    # refused while the other writes, or (if it started late) because the other already finished: never two runs
    reasons = ("writing to", "locked", "interrupted run", "holds a finished result")
    assert any(why in results[1][1] for why in reasons), results[1][1]


@pytest.mark.parametrize("change", [
    ["--eval-fraction", "0.2"], ["--max-eval-tokens", "48"], ["--steps", "6"], ["--seq-len", "20"],
    ["--compute-dtype", "bfloat16"], ["--model-dtype", "bfloat16"], ["--lr", "0.02"], ["--freq-alpha", "0.5"],
    ["--corpus", "CHANGED"],
], ids=lambda c: c[0])
def test_resume_refuses_every_result_changing_setting(files, tmp_path, capsys, eager_kl, change):
    out = tmp_path / "run"
    argv = train_args(files, out, "--steps", "4")
    assert cli(train_probes.main, argv, capsys)[0] == 0
    as_interrupted(out)  # the checkpoint is what matters
    if change == ["--corpus", "CHANGED"]:
        other = tmp_path / "other.txt"
        other.write_text(TEXT.replace("fox", "owl"), encoding="utf-8")
        change = ["--corpus", str(other)]
    rc, err = cli(train_probes.main, argv + change + ["--resume"], capsys)
    assert rc == 2 and "cannot resume" in err, err
    key = {"--freq-alpha": "alpha", "--corpus": "data"}.get(change[0], change[0][2:].replace("-", "_"))
    assert key in err, err
    # settings that cannot change the result stay free
    assert cli(train_probes.main, argv + ["--resume", "--checkpoint-every", "3", "--chunk-rows", "5"], capsys)[0] == 0


@pytest.mark.slow  # several processes or a kill and resume: the full suite runs it
def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(files, tmp_path):
    from safetensors.torch import load_file

    script = str(Path(__file__).parent.parent / "train_probes.py")
    env = {**os.environ, "LENSES_COMPILE": "0"}
    straight = tmp_path / "a"
    subprocess.run([sys.executable, script, *train_args(files, straight, "--steps", "40")], env=env, check=True,
                   capture_output=True, timeout=300)
    out = tmp_path / "b"
    argv = [sys.executable, script, *train_args(files, out, "--steps", "40", "--checkpoint-every", "1000")]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / ".lenses-lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # while it loads the model: it stops at the first step boundary
    assert proc.wait(timeout=120) == 130  # interrupted (docs/reliability.md), with the line that says how to go on
    err = proc.stderr.read()
    assert "interrupted after step" in err and "--resume" in err and "Traceback" not in err, err
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 40, step  # stopped mid-run, at a step boundary, without waiting for the periodic checkpoint
    subprocess.run(argv + ["--resume"], env=env, check=True, capture_output=True, timeout=300)
    a, b = load_file(str(straight / "translators.safetensors")), load_file(str(out / "translators.safetensors"))
    assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["bias"], b["bias"])


# --------------------------------------------------------------------------- one line, exit 2, before any work


BAD_OPTIONS = [  # (which CLI, options, what the one line must say)
    ("train", ["--seq-len", "0"], "--seq-len must be at least 2"),
    ("train", ["--batch-size", "-1"], "--batch-size must be at least 1"),
    ("train", ["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
    ("train", ["--max-tokens", "-5"], "--max-tokens must be at least 1"),
    ("train", ["--lr", "-0.1"], "--lr must be greater than 0 (got -0.1)"),
    ("train", ["--lr", "nan"], "not a finite number"),
    ("train", ["--eval-fraction", "1.5"], "--eval-fraction must be less than 1"),
    ("train", ["--model-dtype", "float8"], "invalid choice"),
    ("train", ["--compute-dtype", "int4"], "invalid choice"),
    ("train", ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device"),
    ("train", ["--device", "toaster"], "not a device name"),
    ("train", ["--steps", "three"], "not a whole number"),
    ("train", ["--freq-keep-prob", "2"], "--freq-keep-prob: must be at most 1"),
    ("train", ["--momentum", "1"], "--momentum: must be below 1"),
    ("train", ["--chunk-rows", "0"], "--chunk-rows"),
    ("train", ["--no-such-option"], "unrecognized arguments"),
    ("analyze", ["--num-prompts", "-1"], "--num-prompts must be at least 2"),
    ("analyze", ["--num-positions", "0"], "--num-positions must be at least 1"),
    ("analyze", ["--top-k", "0"], "--top-k must be at least 1"),
    ("analyze", ["--prompt", "   "], "--prompt: is empty"),
    ("analyze", ["--view", "nope"], "invalid choice"),
    ("analyze", ["--alpha", "0"], "--alpha must be greater than 0"),
    ("analyze", ["--num-facts", "-2"], "--num-facts must be at least 1"),
    ("analyze", ["--device-map", "everywhere"], "invalid choice"),
]


@pytest.mark.parametrize("which,bad,message", BAD_OPTIONS, ids=lambda x: str(x)[:40])
def test_options_are_checked_before_any_work(which, bad, message, capsys, monkeypatch, tmp_path):
    main = {"train": train_probes.main, "analyze": analyze.main}[which]
    monkeypatch.setattr("lenses.model.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc, err = cli(main, ["--out", str(tmp_path / "o"), *bad], capsys)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def _write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD_FILES = [  # (option, file name, content, words the message must contain)
    ("--facts", "f.jsonl", b"\xff\xfe not utf-8", "not UTF-8"),
    ("--facts", "f.jsonl", '{"prompt": 3, "answer": "x"}\n', "non-empty string"),
    ("--facts", "f.jsonl", '["just", "strings"]', "JSON object"),
    ("--facts", "f.jsonl", '{"requested_rewrite": {"prompt": "{} {}", "subject": "x"}}\n', "expected fields"),
    ("--facts", "f.jsonl", '[{"prompt": "a", "answer": "b"', "not valid JSON"),
    ("--facts", "f.jsonl", "", "holds no facts"),
    ("--mcq", "m.csv", b"Q,a,b,c,d,A\n\xff\n", "not UTF-8"),
    ("--mcq", "m.csv", "Q,a,b,c,d,E\n", "not one of the options"),
    ("--mcq", "m.csv", "Q,a,b,c,A\n", "row 1 has 5 fields"),
    ("--corpus", "c.jsonl", '{"text": 5}\n', "string field"),
    ("--frequencies", "f.safetensors", b"\x00" * 40, "corrupt"),
    ("--lens", "lensdir", None, "not a lens folder"),
]


@pytest.mark.parametrize("option,name,content,words", BAD_FILES, ids=lambda x: str(x)[:30])
def test_bad_files_give_one_line_with_the_file(files, tmp_path, capsys, eager_kl, option, name, content, words):
    if content is None:
        (tmp_path / name).mkdir()
        path = tmp_path / name
    else:
        path = _write(tmp_path / name, content)
    view = {"--facts": "facts", "--mcq": "mcq", "--corpus": "frequency", "--frequencies": "frequency"}.get(option,
                                                                                                          "facts")
    argv = ["--model", str(files / "model"), "--lens", "logit", "--view", view, "--no-progress", "--num-positions",
            "5", "--out", str(tmp_path / "o"), option, str(path)]
    rc, err = cli(analyze.main, argv, capsys)
    assert rc == 2 and words in err and name in err, err


@pytest.mark.parametrize("content,words", [(b"GGUF" + b"\x00" * 64, "GGUF"), (b"not a model at all", "GGUF")])
def test_broken_gguf_files(tmp_path, capsys, content, words):
    gguf = _write(tmp_path / "m.gguf", content)
    rc, err = cli(analyze.main, ["--model", str(gguf), "--lens", "logit", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and words in err and "m.gguf" in err, err


def test_truncated_model_weights_and_bad_config(files, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(files / "model", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc, err = cli(analyze.main, ["--model", str(broken), "--lens", "logit", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "could not be loaded" in err, err
    (broken / "config.json").write_text("[1, 2, 3]")
    rc, err = cli(analyze.main, ["--model", str(broken), "--lens", "logit", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "could not be loaded" in err, err


def test_empty_results_are_results(files, tmp_path, capsys, eager_kl):
    """A random model knows none of the facts: the view says so, writes its trace, and exits 0."""
    out = tmp_path / "o"
    rc, _ = cli(analyze.main, ["--model", str(files / "model"), "--lens", "logit", "--view", "facts", "--facts",
                               str(files / "facts.jsonl"), "--no-progress", "--out", str(out)], capsys)
    assert rc == 0
    assert "nothing to score" in capsys.readouterr().out or (out / "facts_positions.csv").exists()
    assert (out / "facts.png").exists() and (out / "facts_positions.csv").exists()
