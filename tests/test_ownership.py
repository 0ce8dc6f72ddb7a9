"""Every result says what it used, every file written has an owner, everything paired with a model is
identified, and nothing unexpected escapes the CLIs (issue: "every documented command runs").

Each test re-runs one of the cases a new user hit, or a neighbour of it, and checks the behaviour the
docs promise: one ``error:`` line and exit 2 where the input is wrong, no file changed that lenses did
not write, and data accounting lines that match what was traced.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_models import TEXT, random_lens, save_tiny_model, tiny_adapter, tiny_inputs, tiny_model

from lenses import LensesError, TunedLens, load_lens
from lenses.base.errors import CorruptFileError, LensMismatchError
from lenses.base.options import INTERNAL_ERROR, run_cli
from lenses.commands import analyze, fit
from lenses.commands import train as train_probes
from lenses.jobs.train import TrainConfig
from lenses.model.adapter import ModelAdapter

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_inputs(tmp_path_factory.mktemp("own"))


def cli(main, argv, capsys):
    rc = run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def train_args(files, out, *extra):
    return ["--model", files / "model", "--corpus", files / "my.txt", "--out", out, "--seq-len", "32",
            "--batch-size", "2", "--steps", "2", "--max-eval-tokens", "64", "--no-progress", *extra]


def view_args(files, out, *extra):
    return ["--model", files / "model", "--corpus", files / "my.txt", "--out", out, "--lens", "logit",
            "--no-progress", *extra]


# --------------------------------------------------------------------------- one owner for every path


def test_a_folder_is_never_adopted_because_of_a_file_name(files, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"my own file")
    for extra in ([], ["--resume"], ["--overwrite"]):
        rc, _, err = cli(train_probes.main, train_args(files, out, *extra), capsys)
        assert rc == 2 and "checkpoint.pt" in err and "not made by lenses" in err, err
        assert err.count("\n") == 1
    assert (out / "checkpoint.pt").read_bytes() == b"my own file" and sorted(os.listdir(out)) == ["checkpoint.pt"]


def test_overwrite_touches_only_the_manifest(files, tmp_path, capsys, eager_kl):
    out = tmp_path / "run"
    assert cli(train_probes.main, train_args(files, out), capsys)[0] == 0
    mark = json.loads((out / ".lenses-out").read_text())
    assert mark["state"] == "finished" and mark["kind"] == "train"
    assert {"config.json", "translators.safetensors", "checkpoint.pt", "eval_kl.png"} <= set(mark["files"])
    (out / "notes.txt").write_text("mine")  # a file lenses did not write: the folder is refused, even with --overwrite
    rc, _, err = cli(train_probes.main, train_args(files, out, "--overwrite"), capsys)
    assert rc == 2 and "notes.txt" in err and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert cli(train_probes.main, train_args(files, out, "--overwrite"), capsys)[0] == 0


def test_resume_over_a_finished_result_or_another_kind_is_refused(files, tmp_path, capsys, eager_kl):
    out = tmp_path / "run"
    assert cli(train_probes.main, train_args(files, out), capsys)[0] == 0
    lens = (out / "translators.safetensors").read_bytes()
    (out / "checkpoint.pt").unlink()  # the checkpoint is gone: --resume must not train a new lens from step 0
    rc, _, err = cli(train_probes.main, train_args(files, out, "--resume"), capsys)
    assert rc == 2 and "nothing to resume" in err
    assert (out / "translators.safetensors").read_bytes() == lens
    rc, _, err = cli(fit.main, ["--model", files / "model", "--corpus",
                                         files / "my.txt", "--out", out, "--resume", "--no-progress"], capsys)
    assert rc == 2 and "train run" in err, err


def test_analysis_of_other_settings_is_refused_then_replaced_with_overwrite(files, tmp_path, capsys, eager_kl):
    out = tmp_path / "out"
    assert cli(analyze.main, view_args(files, out, "--view", "early-exit", "--num-positions", "20"), capsys)[0] == 0
    other = tmp_path / "other_model"
    save_tiny_model(other, seed=3)
    argv = view_args(files, out, "--view", "early-exit", "--num-positions", "20")
    argv[1] = other
    before = (out / "early-exit_layers.csv").read_bytes()
    rc, _, err = cli(analyze.main, argv, capsys)
    assert rc == 2 and "other settings" in err and "model" in err and "--overwrite" in err
    assert (out / "early-exit_layers.csv").read_bytes() == before
    # a view of the same settings joins the page; a view of other settings replaces the old ones
    assert cli(analyze.main, view_args(files, out, "--view", "agreement", "--lens", "logit,logit2:" + str(
        _lens_folder(files, tmp_path)), "--num-positions", "20"), capsys)[0] == 2  # other lenses: refused too
    assert cli(analyze.main, [*argv, "--overwrite"], capsys)[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in report["views"]] == ["early-exit"]
    assert report["views"][0]["settings"]["model"] == str(other)


def _lens_folder(files, tmp_path):
    folder = tmp_path / "lens"
    if not folder.exists():
        from transformers import AutoModelForCausalLM

        from lenses.model.adapter import ModelAdapter

        adapter = ModelAdapter.from_model(AutoModelForCausalLM.from_pretrained(files / "model"))
        random_lens(adapter).save_pretrained(folder)
    return folder


def test_html_and_png_targets_lenses_did_not_write_need_overwrite(files, tmp_path, capsys, eager_kl):
    mine = tmp_path / "report.html"
    mine.write_text("<p>my page</p>")
    out = tmp_path / "out"
    rc, _, err = cli(analyze.main, view_args(files, out, "--prompt", "The fox", "--html", mine), capsys)
    assert rc == 2 and "was not written by lenses" in err and mine.read_text() == "<p>my page</p>"
    page, fig = tmp_path / "lens.html", tmp_path / "lens.png"
    assert cli(analyze.main, view_args(files, out, "--prompt", "The fox", "--html", page, "--png", fig), capsys)[0] == 0
    # our own page and figure (outside --out) are recognised and replaced by the same command
    assert cli(analyze.main, view_args(files, out, "--prompt", "The fox", "--html", page, "--png", fig), capsys)[0] == 0
    assert cli(analyze.main, view_args(files, tmp_path / "out2", "--prompt", "The fox", "--html", mine,
                                       "--overwrite"), capsys)[0] == 0
    assert "lenses-toolkit" in mine.read_text()


def test_save_pretrained_refuses_a_model_folder(files, tmp_path):
    adapter = tiny_adapter("llama")
    model_dir = tmp_path / "m"
    save_tiny_model(model_dir)
    before = (model_dir / "config.json").read_bytes()
    with pytest.raises(LensesError, match="did not write"):
        TunedLens.for_model(adapter).save_pretrained(model_dir)
    assert (model_dir / "config.json").read_bytes() == before
    TunedLens.for_model(adapter).save_pretrained(tmp_path / "lens")
    TunedLens.for_model(adapter).save_pretrained(tmp_path / "lens")  # our own lens folder: replaced


# --------------------------------------------------------------------------- identity


def test_a_lens_is_refused_on_a_model_that_shares_only_its_unembedding(tmp_path):
    a = tiny_model("llama", seed=0)
    b = tiny_model("llama", seed=1)
    with torch.no_grad():  # same embeddings and unembedding, other blocks
        b.lm_head.weight.copy_(a.lm_head.weight)
        b.model.embed_tokens.weight.copy_(a.model.embed_tokens.weight)
        b.model.norm.weight.copy_(a.model.norm.weight)
    lens = random_lens(ModelAdapter.from_model(a))
    lens.save_pretrained(tmp_path / "lens")
    with pytest.raises(LensMismatchError, match=r"model\.layers\.\d\..* differ: norm"):
        load_lens(tmp_path / "lens", b)
    load_lens(tmp_path / "lens", b, strict=False)  # the user says it is a close variant
    load_lens(tmp_path / "lens", a.to(torch.bfloat16).float())  # a dtype round trip is the same model


def test_a_lens_without_fingerprint_loads_with_one_note(tmp_path, capsys):
    from lenses.kinds.load import export_tuned_lens

    adapter = tiny_adapter("llama")
    export_tuned_lens(random_lens(adapter), tmp_path / "tl")
    capsys.readouterr()
    load_lens(tmp_path / "tl", adapter)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model fingerprint" in err


def test_non_finite_lens_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = tiny_adapter("llama")
    random_lens(adapter).save_pretrained(tmp_path / "lens")
    tensors = load_file(tmp_path / "lens" / "translators.safetensors")
    tensors["weight"][1, 2, 3] = float("nan")
    save_file(tensors, tmp_path / "lens" / "translators.safetensors")
    with pytest.raises(CorruptFileError, match="NaN or infinite"):
        load_lens(tmp_path / "lens", adapter)


# --------------------------------------------------------------------------- one error funnel


def test_a_bug_is_one_line_a_crash_log_and_its_own_status(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def broken(*a, **k):
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(analyze, "decode_prompt", broken)
    rc, _, err = cli(analyze.main, view_args(files, out, "--prompt", "The fox"), capsys)
    err = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("note: --corpus is not read"))
    assert rc == INTERNAL_ERROR and err.count("\n") == 1 and err.startswith("error: internal error (RuntimeError")
    log = Path(err.split("traceback is in ")[1].split(";")[0])
    assert log.parent == out and "Traceback" in log.read_text() and "a bug" in log.read_text()
    # the crash log is ours: the next run into the same folder is not refused for it
    monkeypatch.undo()
    assert cli(analyze.main, view_args(files, out, "--prompt", "The fox"), capsys)[0] == 0


def test_a_full_disk_is_our_error(files, tmp_path, capsys, monkeypatch):
    from lenses.base import io

    real = os.replace

    def full(src, dst):
        if str(dst).endswith(".csv"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", full)
    rc, _, err = cli(analyze.main, view_args(files, tmp_path / "out", "--prompt", "The fox"), capsys)
    assert rc == 2 and "could not write" in err and "No space left" in err
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_python_configs_validate_on_construction():
    from lenses.analysis import AnalysisConfig
    from lenses.jobs.jlens_fit import FitConfig

    for make in (lambda: TrainConfig(steps=-5), lambda: TrainConfig(optimizer="sgdd"), lambda: TrainConfig(lr=0),
                 lambda: TrainConfig(seq_len=2.5), lambda: FitConfig(num_prompts=0),
                 lambda: AnalysisConfig(num_positions=0), lambda: AnalysisConfig(top_k="3")):
        with pytest.raises(LensesError):
            make()
    assert TrainConfig(steps=5).steps == 5


def test_token_ids_are_checked_before_any_kernel():
    adapter = tiny_adapter("llama")
    with pytest.raises(LensesError, match="outside the model's embedding"):
        adapter.hidden_states(torch.tensor([[1, 2, 500]]))
    with pytest.raises(LensesError, match="outside the model's embedding"):
        adapter.hidden_states(torch.tensor([[-1, 2]]))
    gpt2 = tiny_adapter("gpt2")  # learned positions: 64 of them
    with pytest.raises(LensesError, match="longer than the model's 64 positions"):
        gpt2.hidden_states(torch.ones(1, 65, dtype=torch.long))


# --------------------------------------------------------------------------- data accounting


def test_views_read_all_of_a_users_own_text_and_say_how_much(files, tmp_path, capsys, eager_kl):
    from transformers import AutoTokenizer

    from lenses.text.data import pack, tokenize

    out = tmp_path / "out"
    rc, stdout, err = cli(analyze.main, view_args(files, out, "--view", "early-exit", "--num-positions", "100000"),
                          capsys)
    assert rc == 0, err
    tok = AutoTokenizer.from_pretrained(files / "model")
    available = len(pack(tokenize([TEXT], tok), 128)) * 127  # every block of the file, none held out
    line = next(ln for ln in stdout.splitlines() if ln.startswith("data:"))
    assert f"{available:,} of {available:,} positions" in line and "my.txt" in line and "fewer than requested" in line
    layers = pd.read_csv(out / "early-exit_layers.csv")
    assert (layers.n == available).all()
    report = json.loads((out / "report.json").read_text())
    assert report["views"][0]["data"][0]["used"] == available
    assert f"{available:,} of {available:,}" in (out / "index.html").read_text()


def test_views_hold_out_the_corpus_a_lens_was_trained_on(files, tmp_path, capsys, eager_kl):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(10):
        (docs / f"{i}.txt").write_text(f"Document {i}. " + TEXT[: 2000], encoding="utf-8")
    lens_dir = tmp_path / "lens"
    argv = train_args(files, lens_dir)
    argv[3] = docs
    assert cli(train_probes.main, argv, capsys)[0] == 0
    out = tmp_path / "out"
    argv = view_args(files, out, "--view", "early-exit", "--lens", f"logit,{lens_dir}", "--num-positions", "100000")
    argv[3] = docs
    rc, stdout, _ = cli(analyze.main, argv, capsys)
    assert rc == 0
    line = next(ln for ln in stdout.splitlines() if ln.startswith("data:"))
    assert "held-out" in line and "tuned lens was trained on the others" in line


def test_training_says_when_text_repeats_and_records_it(files, tmp_path, capsys, eager_kl):
    small = tmp_path / "small.txt"
    small.write_text(TEXT[:3000], encoding="utf-8")  # about 2,700 training tokens
    argv = train_args(files, tmp_path / "run", "--steps", "80")
    argv[3] = small
    rc, stdout, _ = cli(train_probes.main, argv, capsys)
    assert rc == 0 and "the training text repeats" in stdout and "held-out evaluation on" in stdout
    data = json.loads((tmp_path / "run" / "config.json").read_text())["training"]["data"]
    assert data["passes"] > 1 and data["train_tokens_used"] == 80 * 2 * 32


# --------------------------------------------------------------------------- interruption of analysis


@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_sigterm_in_analysis_is_one_line_releases_the_lock_and_marks_missing_views(files, tmp_path):
    out = tmp_path / "out"
    # the first view (frequency) is quick; the second (part of speech) loads spaCy first: SIGTERM lands there
    cmd = [sys.executable, str(ROOT / "analyze.py"), *map(str, view_args(files, out, "--view", "all",
                                                                         "--num-positions", "20"))]
    proc = subprocess.Popen(cmd, env={**os.environ, "LENSES_COMPILE": "0"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "report.json").exists() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted") and "Traceback" not in err
    assert not (out / ".lenses-lock").exists()
    assert json.loads((out / ".lenses-out").read_text())["state"] == "interrupted"
    page = (out / "index.html").read_text()
    assert "Missing" in page and "interrupted" in page


def test_every_reader_checks_its_declared_fields(tmp_path):
    """Facts, tasks, JSONL corpora and lens configs are checked through their schema (lenses.base.schema)."""
    from lenses.analysis.facts import read_facts
    from lenses.analysis.patching import _read_rows
    from lenses.base.errors import DataError
    from lenses.kinds.files import read_config
    from lenses.text.data import read_texts

    cases = [
        (read_facts, "f.jsonl", '{"prompt": "x"}\n', DataError, "has no non-empty string field 'answer'"),
        (read_facts, "g.jsonl", '{"prompt": "x", "answer": "y", "relation": 3}\n', DataError, "field 'relation'"),
        (_read_rows, "t.jsonl", '{"prompt": "x", "labels": [" a"]}\n', DataError, "'labels' has 1 item"),
        (_read_rows, "u.jsonl", '{"prompt": "x", "labels": [" a", 2]}\n', DataError, "every item of 'labels'"),
        (read_texts, "c.jsonl", '{"text": ["a"]}\n', DataError, "has no string field 'text'"),
    ]
    for reader, name, text, error, words in cases:
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(error, match=words) as e:
            reader(tmp_path / name)
        assert f"{name}:1" in str(e.value)
    (tmp_path / "lens").mkdir()
    (tmp_path / "lens" / "config.json").write_text('{"lens": "tuned", "num_layers": "30"}')
    with pytest.raises(CorruptFileError, match="whole-number field 'num_layers'"):
        read_config(tmp_path / "lens")
