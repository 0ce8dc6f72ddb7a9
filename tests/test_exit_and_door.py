"""Nothing crashes, nothing silent: the one exit path (`lenses.base.lifecycle`), the door of the Python API
(`lenses.base.door`), bounded work, and the identity every weight counts in (`lenses.model.fingerprint`)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import random_lens, tiny_adapter, tiny_inputs, tiny_model

from lenses import LensesError, LensMismatchError, ModelAdapter, load_lens
from lenses.base import lifecycle
from lenses.base.options import run_cli
from lenses.commands import analyze
from lenses.model import fingerprint as fp
from lenses.text.chat import generate
from lenses.tracing.trace import TraceItem, trace

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tiny_inputs(tmp_path_factory.mktemp("exit"))
    (root / "empty.txt").write_text("", encoding="utf-8")
    return root


# ---------------------------------------------------------------------------- 1. one exit path


def test_background_work_is_joined_before_the_exit_status(capsys):
    """An error while a background thread works (the kernel compile) returns 2 only after the thread ended."""
    done = []

    def main(argv):
        lifecycle.start_background(lambda: (time.sleep(0.5), done.append(1)), "slow")
        raise LensesError("the corpus is empty; pass a corpus with text.")

    assert run_cli(main, []) == 2
    assert done == [1] and not [t for t in threading.enumerate() if t.name == "slow"]
    assert capsys.readouterr().err.strip() == "error: the corpus is empty; pass a corpus with text."


def _early_error(inputs, env) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "analyze.py"), "--model", str(inputs / "model"), "--lens", "logit", "--view",
            "early-exit", "--corpus", str(inputs / "empty.txt"), "--out", str(inputs / f"o{time.time_ns()}")]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow  # 20 processes that each compile the kernels (~4 min); the fast tier checks the join in-process
@pytest.mark.parametrize("runs", [pytest.param(20, id="20")])
def test_an_early_error_never_aborts_the_process(inputs, runs, tmp_path):
    """The probe case that aborted with 134 in 3 of 6 runs: the error comes while the kernels compile."""
    env = {**os.environ, "LENSES_CACHE": str(tmp_path / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"),
           "LENSES_COMPILE": "1"}  # the kernels compile in the background when the error comes
    codes = []
    for _ in range(runs):
        r = _early_error(inputs, env)
        codes.append(r.returncode)
        assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr[-800:]
    assert codes == [2] * runs


def test_a_signal_swallowed_on_its_way_still_ends_with_130(capsys):
    """A KeyboardInterrupt raised inside a ``__del__`` is printed and dropped by Python; the flag is not."""

    class Dropper:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    def main(argv):
        Dropper()  # deleted at once: the handler raises inside __del__, Python ignores it
        return 0

    assert run_cli(main, []) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_sigterm_while_loading_ends_with_130_every_time(inputs, monkeypatch, tmp_path, capsys):
    """20 of 20: SIGTERM at a random moment of a slow model load stops the run with 130, never 0."""
    from lenses.model import loading

    real = loading.load_model

    def slow_load(*a, **k):
        end = time.time() + 0.3
        while time.time() < end:  # Python code, as loading runs: a signal lands between bytecodes
            sum(range(1000))
        return real(*a, **k)

    monkeypatch.setattr(loading, "load_model", slow_load)
    rng = np.random.default_rng(0)
    codes = []
    for i in range(20):
        timer = threading.Timer(float(rng.uniform(0.02, 0.25)), os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        codes.append(run_cli(analyze.main, ["--model", str(inputs / "model"), "--lens", "logit", "--prompt", "The fox",
                                            "--out", str(tmp_path / f"o{i}")]))
        timer.join()
    assert codes == [130] * 20
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- 3. the door


def test_target_ids_and_positions_are_checked_before_any_kernel():
    ad = tiny_adapter()
    lenses = {"logit": random_lens(ad)}
    for targets in ([999_999], [-5], [1.0]):
        with pytest.raises(LensesError, match=r"targets\['next'\]"):
            trace(ad, lenses, [TraceItem([1, 2, 3], [0], {"next": targets})])
    with pytest.raises(LensesError, match="position 3 is outside an item of 3 tokens"):
        trace(ad, lenses, [TraceItem([1, 2, 3], [3])])  # once wrapped around to position 0
    with pytest.raises(LensesError, match="whole numbers"):
        trace(ad, lenses, [TraceItem([1.7, 2, 3], [0])])  # once truncated to token 1
    table = trace(ad, lenses, [TraceItem([1, 2, 3], [-1], {"next": [4]})])
    assert set(table.position) == {2}  # -1 counts from the end


@pytest.mark.parametrize("call, words", [
    (lambda lens, h: lens(h, True), "layer must be a whole number"),
    (lambda lens, h: lens(h, 1.5), "layer must be a whole number"),
    (lambda lens, h: lens(h, 99), "layer must be 0..3"),
    (lambda lens, h: lens(h.numpy(), 1), "torch.from_numpy"),
    (lambda lens, h: lens(torch.empty_like(h, device="meta"), 1), "meta device"),
    (lambda lens, h: lens(h[:, :5], 1), r"shape \[\.\.\., 32\]"),
    (lambda lens, h: lens(h.long(), 1), "floating-point"),
    (lambda lens, h: lens(h, 1, "float8"), "dtype must be"),
])
def test_a_lens_call_checks_its_arguments(call, words):
    lens = random_lens(tiny_adapter())
    with pytest.raises(LensesError, match=words):
        call(lens, torch.randn(4, 32))


def test_public_functions_refuse_bad_arguments_in_one_line():
    from lenses import load_model

    model = tiny_model("llama")
    cases = [(lambda: load_lens(123), "path must be"), (lambda: load_model(dtype="float8"), "dtype must be"),
             (lambda: load_model(device="bfloat16"), "not the dtype"),
             (lambda: ModelAdapter.from_model("tiny"), "model must be a loaded model"),
             (lambda: generate(model, [], 3), "at least one token"),
             (lambda: generate(model, [1, 2], 99999999999999999999), r"must be 1\.\."),
             (lambda: trace(tiny_adapter(), {}, [(1, 2, 3)]), "must be a TraceItem"),
             (lambda: trace(tiny_adapter(), {}, [], chunk=0), "chunk must be at least 1")]
    for call, words in cases:
        with pytest.raises(LensesError, match=words):
            call()


def _draw(rng: np.random.Generator, pool: list):
    return pool[int(rng.integers(len(pool)))]


def test_fuzz_the_public_api_only_lenses_errors_or_success():
    """A seeded generator over argument types and ranges of the public functions: every call succeeds or
    raises a LensesError; never another exception (and never an abort: the process lives on)."""
    from tiny_models import byte_tokenizer

    from lenses import LogitLens, load_model
    from lenses.pages.grid import lens_grid
    from lenses.tracing.depth import depth_summary

    ad = tiny_adapter(vocab_size=257)
    tok = byte_tokenizer()
    lens = random_lens(ad)
    model = ad.model
    h = torch.randn(2, 32)
    anything = [None, True, 0, -1, 1, 3, 4, 10**20, 1.5, float("nan"), "x", "", "bfloat16", "cpu", b"1", [], [1],
                [1.5], [-3], [10**9], (1, 2), {}, {"next": [1]}, np.int64(2), np.array([1, 2]), torch.tensor([1, 2]),
                torch.tensor(1.5), torch.float16, torch.randn(2, 32), torch.randn(3), object()]
    calls = [
        lambda a, b: lens(a, b), lambda a, b: lens(h, a, b), lambda a, b: load_lens(a, b),
        lambda a, b: trace(ad, {"l": lens}, [TraceItem([1, 2, 3], a, {"next": b})]) if isinstance(a, list) else
        trace(ad, {"l": lens}, a),
        lambda a, b: trace(ad, {"l": lens}, [TraceItem(a, [0])], chunk=b if isinstance(b, int) else 8),
        lambda a, b: trace(ad, {"l": lens}, [TraceItem([1, 2], [0])], top_k=a, batch_size=b),
        lambda a, b: generate(model, a, b), lambda a, b: generate(model, [1, 2], 2, sample=a, seed=b),
        lambda a, b: ModelAdapter.from_model(a, layers=b), lambda a, b: LogitLens(a),
        lambda a, b: load_model("x" if a is None else a, device="cpu", dtype=b), lambda a, b: lens.attach(a, strict=b),
        lambda a, b: load_lens("smollm2-135m-instruct", model=a, strict=b),
        lambda a, b: lens_grid(ad, tok, a, {"l": lens}, top_k=b if isinstance(b, int) else 2),
        lambda a, b: lens_grid(ad, tok, "ab", {"l": lens}, ids=a, roles=b),
        lambda a, b: depth_summary(a, b if isinstance(b, str) else "next"),
    ]
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "LensesError": 0}
    for _ in range(400):
        call, a, b = _draw(rng, calls), _draw(rng, anything), _draw(rng, anything)
        try:
            call(a, b)
            outcomes["ok"] += 1
        except LensesError:
            outcomes["LensesError"] += 1
    assert outcomes["ok"] > 5 and outcomes["LensesError"] > 200


# ---------------------------------------------------------------------------- 4. bounded, recorded work


def test_generate_past_its_bound_is_refused_before_the_model_loads(inputs, monkeypatch, capsys):
    from lenses.model import loading

    monkeypatch.setattr(loading.ModelOptions, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    start = time.perf_counter()
    code = run_cli(analyze.main, ["--model", str(inputs / "model"), "--prompt", "x", "--generate",
                                  "99999999999999999999"])
    assert code == 2 and time.perf_counter() - start < 1.0
    assert "--generate must be less than 4097" in capsys.readouterr().err


def test_generation_stops_at_the_model_s_positions():
    model = tiny_model("gpt2")  # 64 absolute positions
    with pytest.raises(LensesError, match=r"must be 1\.\.54"):
        generate(model, list(range(1, 11)), 60)
    assert len(generate(model, list(range(1, 11)), 54)) == 54


def test_an_edited_generated_corpus_source_is_generated_again(tmp_path, monkeypatch):
    from test_chat import _tok

    from lenses.text.chat import generated_corpus

    monkeypatch.setenv("LENSES_CACHE", str(tmp_path / "cache"))
    adapter = ModelAdapter.from_model(tiny_model("llama", vocab_size=257))
    corpus = tmp_path / "docs.jsonl"

    def write(word):
        text = "Document {i} is about {word} number {i}, and about nothing else at all."
        corpus.write_text("\n".join(json.dumps({"text": text.format(i=i, word=word)}) for i in range(4)))
    write("apples")
    first = generated_corpus(adapter, _tok(), f"generated:2:{corpus}")
    write("pears")  # the same name, other contents
    second = generated_corpus(adapter, _tok(), f"generated:2:{corpus}")
    assert all("apples" in t for t in first) and all("pears" in t for t in second)


def test_int8_covers_gpt2_conv1d_layers():
    from lenses.model.adapter import is_quantized
    from lenses.model.loading import quantize_weights

    model = tiny_model("gpt2")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    before = model(ids).logits
    quantize_weights(model, "int8")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Conv1D" not in kinds
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 4 * 3 + 1 and all(is_quantized(m.weight) for m in linear)  # 4 per block, and lm_head
    assert torch.allclose(model(ids).logits, before, atol=0.05 * float(before.abs().max()))


# ---------------------------------------------------------------------------- 5. identity of every weight


def _scaled(model, part: str, factor: float):
    m = copy.deepcopy(model)
    with torch.no_grad():
        next(p for n, p in m.named_parameters() if part in n).mul_(factor)
    return m


def test_every_weight_counts_in_the_identity(capsys):
    """The probe case: a lens loaded onto its model with one mlp.down_proj scaled by 1.5 (untouched by the old
    probes) is refused, and so is a scale of 1.05; a bfloat16 cast is the same model; int8 and int4 copies
    are read with a note; another seed is refused; strict=False reads anyway, with a note."""
    from lenses.model.loading import quantize_weights

    model = tiny_model("llama")
    lens = random_lens(ModelAdapter.from_model(model))
    saved = lens.config["fingerprint"]
    for layer in range(3):
        with pytest.raises(LensMismatchError, match=rf"layers\.{layer}\.mlp\.down_proj\.weight differ: norm x1\.5,"):
            ModelAdapter.from_model(_scaled(model, f"layers.{layer}.mlp.down_proj", 1.5)).check_fingerprint(saved)
    with pytest.raises(LensMismatchError, match="another model"):
        ModelAdapter.from_model(_scaled(model, "layers.1.mlp.down_proj", 1.05)).check_fingerprint(saved)
    assert ModelAdapter.from_model(copy.deepcopy(model).to(torch.bfloat16)).check_fingerprint(saved) is None
    for scheme in ("int8", "int4"):
        note = ModelAdapter.from_model(quantize_weights(copy.deepcopy(model), scheme)).check_fingerprint(saved)
        assert note and f"quantized to {scheme}" in note
    with pytest.raises(LensMismatchError, match="another model"):
        ModelAdapter.from_model(tiny_model("llama", seed=3)).check_fingerprint(saved)
    other = ModelAdapter.from_model(tiny_model("llama", seed=3)).check_fingerprint(saved, strict=False)
    assert other and "read anyway" in other


def test_the_fingerprint_against_a_float64_reference():
    """Norm and projections of one tensor, recomputed here in float64 from the documented definition."""
    w = torch.randn(37, 300, generator=torch.Generator().manual_seed(0))
    flat = w.double().reshape(-1)
    norm = float(flat.norm())
    i = torch.arange(flat.numel(), dtype=torch.int64) % 4099
    expect = [norm]
    for k in (1, 2):
        h = (i * 2654435761 + k * 2246822519) % 2**32
        h = (h ^ (h >> 13)) * 3266489917 % 2**32
        signs = ((h >> 16) & 1).double() * 2 - 1
        expect.append(float((signs * flat).sum()) / norm)
    got = fp.tensor_summary(w, chunk=4099 * 3)  # chunks that split the tensor: the same sums
    assert np.allclose(got, expect, atol=2e-6)


def test_shipped_lenses_carry_a_full_weight_fingerprint():
    for config in (ROOT / "lenses" / "pretrained").glob("*/config.json"):
        weights = json.loads(config.read_text())["fingerprint"]["weights"]
        assert weights["version"] == fp.VERSION and len(weights["tensors"]) > 200, config


def test_a_whole_model_different_in_every_block_is_another_model():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    verdict, _, how = fp.compare(fp.of_model(a), fp.of_model(b))
    assert verdict == "other" and float(how.rsplit(" ", 1)[1]) > fp.CLOSE[1]
    assert fp.compare(fp.of_model(a), fp.of_model(a))[0] == "same"


# ---------------------------------------------------------------------------- 2. ownership per run


def _cli(argv, capsys) -> tuple[int, str]:
    rc = run_cli(analyze.main, [str(a) for a in argv])
    return rc, capsys.readouterr().err


def _views(inputs, out, *extra):
    return ["--model", inputs / "model", "--corpus", inputs / "my.txt", "--out", out, "--lens", "logit",
            "--no-progress", *extra]


def test_a_view_not_redone_stays_on_the_page(inputs, tmp_path, capsys, eager_kl):
    """The probe case: adding a view with --overwrite deleted another view whose own settings differ from the
    defaults (it was compared with settings this run does not use). Now it stays, with or without --overwrite."""
    out = tmp_path / "out"
    assert _cli(_views(inputs, out, "--view", "early-exit", "--num-positions", "20"), capsys)[0] == 0
    kept = (out / "early-exit_layers.csv").read_bytes()
    for extra in ([], ["--overwrite"]):
        rc, err = _cli(_views(inputs, out, "--view", "calibration", "--num-positions", "30", *extra), capsys)
        assert rc == 0, err
        assert (out / "early-exit_layers.csv").read_bytes() == kept
        names = [v["name"] for v in json.loads((out / "report.json").read_text())["views"]]
        assert sorted(names) == ["calibration", "early-exit"]


def test_a_view_not_redone_of_another_model_is_refused_even_with_overwrite(inputs, tmp_path, capsys, eager_kl):
    from tiny_models import save_tiny_model

    out = tmp_path / "out"
    assert _cli(_views(inputs, out, "--view", "early-exit", "--num-positions", "20"), capsys)[0] == 0
    other = tmp_path / "other"
    save_tiny_model(other, seed=3)
    argv = _views(inputs, out, "--view", "calibration", "--num-positions", "20", "--overwrite")
    argv[1] = other
    rc, err = _cli(argv, capsys)
    assert rc == 2 and "does not redo" in err and "model" in err and (out / "early-exit_layers.csv").exists()


def test_png_and_html_onto_another_run_s_files_are_refused(inputs, tmp_path, capsys, eager_kl):
    page, fig = tmp_path / "grid.html", tmp_path / "grid.png"
    first = _views(inputs, tmp_path / "o1", "--prompt", "The fox", "--html", page, "--png", fig)
    assert _cli(first, capsys)[0] == 0
    before = page.read_bytes(), fig.read_bytes()
    for option, target in (("--html", page), ("--png", fig)):
        rc, err = _cli(_views(inputs, tmp_path / "o2", "--prompt", "The cat", option, target), capsys)
        assert rc == 2 and "another lenses run" in err
    assert (page.read_bytes(), fig.read_bytes()) == before
    assert _cli(first, capsys)[0] == 0  # the same run again replaces its own
    assert _cli(_views(inputs, tmp_path / "o2", "--prompt", "The cat", "--png", fig, "--overwrite"), capsys)[0] == 0


def test_a_nested_marked_folder_belongs_to_its_own_runs(tmp_path):
    from lenses.base import io
    from lenses.base.outdir import claim

    with claim(tmp_path / "parent", "train") as parent:
        parent.finish()
    with claim(tmp_path / "parent" / "analysis", "analysis", resumable=False):
        io.write_text(tmp_path / "parent" / "analysis" / "table.csv", "a\n")
    io.write_text(tmp_path / "parent" / "plain" / "file.txt", "b\n")  # an unmarked subfolder: the parent's
    files = io.read_mark(tmp_path / "parent")["files"]
    assert "plain/file.txt" in files and not any(f.startswith("analysis") for f in files)


def test_a_user_s_tmp_file_is_not_ours(tmp_path, capsys):
    from lenses.base.outdir import claim

    out = tmp_path / "out"
    with claim(out, "analysis", resumable=False):
        pass
    (out / ".draft.tmp").write_text("my notes")
    with pytest.raises(LensesError, match=r"did not write \(\.draft\.tmp\)"):
        claim(out, "analysis", resumable=False)
    assert (out / ".draft.tmp").read_text() == "my notes" and "removed" not in capsys.readouterr().err


def test_python_writers_refuse_files_they_did_not_write(tmp_path):
    from tiny_models import byte_tokenizer

    from lenses.kinds.load import export_tuned_lens
    from lenses.pages.grid import lens_grid, plot_grid
    from lenses.pages.grid_page import write_grid_html

    model_folder = tmp_path / "model"
    model_folder.mkdir()
    (model_folder / "config.json").write_text('{"model_type": "llama"}')
    lens = random_lens(tiny_adapter(vocab_size=257))
    with pytest.raises(LensesError, match="not written by lenses"):
        export_tuned_lens(lens, model_folder)
    assert (model_folder / "config.json").read_text() == '{"model_type": "llama"}'
    export_tuned_lens(lens, tmp_path / "export")
    export_tuned_lens(lens, tmp_path / "export")  # its own files: replaced
    table = lens_grid(lens.adapter, byte_tokenizer(), "The fox", {"tuned": lens})
    for write, name in ((lambda p, **k: write_grid_html(table, p, **k), "page.html"),
                        (lambda p, **k: plot_grid(table, p, **k), "fig.png")):
        foreign = tmp_path / name
        foreign.write_bytes(b"mine")
        with pytest.raises(LensesError, match="not written by lenses"):
            write(foreign)
        assert foreign.read_bytes() == b"mine"
        write(foreign, overwrite=True)
        write(foreign)  # now ours


def test_save_published_refuses_a_file_it_did_not_write(tmp_path):
    from lenses import JacobianLens

    ad = tiny_adapter()
    mats = {k: torch.eye(ad.d_model) for k in range(1, ad.num_layers)}
    jl = JacobianLens.from_matrices(mats, ad.num_layers, model=ad)
    foreign = tmp_path / "theirs" / "lens.pt"
    foreign.parent.mkdir()
    foreign.write_bytes(b"theirs")
    (foreign.parent / "other.txt").write_text("x")
    with pytest.raises(LensesError, match="not written by lenses"):
        jl.save_published(foreign)
    jl.save_published(tmp_path / "new" / "lens.pt")
    jl.save_published(tmp_path / "new" / "lens.pt")  # a folder it made: its own file, replaced


def test_a_lock_left_empty_by_a_failed_start_does_not_block(tmp_path, capsys, monkeypatch):
    from lenses.base import outdir

    out = tmp_path / "out"
    with outdir.claim(out, "analysis", resumable=False):
        pass
    (out / outdir.LOCK).write_bytes(b"")
    old = time.time() - 60
    os.utime(out / outdir.LOCK, (old, old))
    with outdir.claim(out, "analysis", resumable=False):
        pass
    assert "taking over the lock" in capsys.readouterr().err and not (out / outdir.LOCK).exists()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outdir.json, "dump", full)
    with pytest.raises(LensesError, match="No space left"):
        outdir.claim(out, "analysis", resumable=False)
    assert not (out / outdir.LOCK).exists()  # nothing left behind to block the next run


# ---------------------------------------------------------------------------- 6. readers that never leak


def test_a_corpus_folder_with_state_json_that_is_no_dataset(tmp_path):
    from lenses.text.data import read_texts

    (tmp_path / "state.json").write_text('{"mine": 1}')
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(LensesError, match="is not a dataset saved with save_to_disk"):
        read_texts(tmp_path)


@pytest.mark.parametrize("payload, words", [
    (b"", "empty"),
    ({"J": {0: torch.eye(32)}, "n_prompts": "x"}, "wrong type"),
    ({"J": {0: torch.eye(32)}, "d_model": "32"}, "not a whole number"),
    ({"J": {0.5: torch.eye(32)}}, "not layer numbers"),
    ({"jacobian_sum": {0: 1}, "n_done": 2}, "wrong type"),
])
def test_damaged_jacobian_lens_files_are_one_line(tmp_path, payload, words):
    file = tmp_path / "lens.pt"
    if isinstance(payload, bytes):
        file.write_bytes(payload)
    else:
        torch.save(payload, file)
    for model in (None, tiny_adapter()):
        with pytest.raises(LensesError, match=words):
            load_lens(file, model)


def test_a_full_disk_inside_safetensors_is_our_error(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          "message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(LensesError, match="could not write .*No space left"):
        random_lens(tiny_adapter()).save_pretrained(tmp_path / "lens")
    assert not list((tmp_path / "lens").glob("*.lenses.tmp"))


def test_a_chat_template_that_refuses_a_system_message(capsys):
    from test_chat import _tok

    from lenses.text.chat import chat_turn

    tok = _tok()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}[assistant]")
    with pytest.raises(LensesError, match="refuses these messages .*System role not supported.*drop --system"):
        chat_turn(tok, "hi", system="be brief")
    assert chat_turn(tok, "hi").ids  # without a system message it reads


def test_fsdp_with_quantize_is_refused_before_any_work(inputs, tmp_path, capsys):
    from lenses.commands import train

    argv = ["--model", inputs / "model", "--corpus", inputs / "my.txt", "--out", tmp_path / "o", "--fsdp",
            "--quantize", "int8", "--no-progress"]
    assert run_cli(train.main, [str(a) for a in argv]) == 2
    assert "--fsdp shards plain weights" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_one_token_prompts_in_the_representation_view(inputs, tmp_path, capsys, eager_kl):
    (tmp_path / "one.txt").write_text("A\nB\nC\n" + "The quick brown fox jumps over the lazy dog\n" * 3)
    argv = _views(inputs, tmp_path / "o", "--view", "representation", "--drop-first-token")
    argv[3] = tmp_path / "one.txt"
    assert _cli(argv, capsys)[0] == 0
    line = json.loads((tmp_path / "o" / "report.json").read_text())["views"][0]["summary"][0]
    assert "3 of 3 prompts" in line and "3 prompt(s) of fewer than 3 tokens" in line


def test_an_out_folder_turning_read_only_is_one_line(inputs, tmp_path, capsys, monkeypatch, eager_kl):
    """Every write into --out fails after the claim (the folder turned read-only), the lock's removal too: the
    run's own error is the one line, and the stuck lock is named."""
    import pathlib

    from lenses.base import io, outdir

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    real_unlink = pathlib.Path.unlink
    monkeypatch.setattr(io.tempfile, "mkstemp", denied)
    monkeypatch.setattr(pathlib.Path, "unlink", lambda self, *a, **k: denied() if self.name == outdir.LOCK
                        else real_unlink(self, *a, **k))
    rc, err = _cli(_views(inputs, tmp_path / "o", "--prompt", "The cat"), capsys)
    assert rc == 2 and err.count("error:") == 1 and "Permission denied" in err and "Traceback" not in err
    assert "could not remove the lock" in err


@pytest.mark.parametrize("job", ["train", "fit", "analyze"])
@pytest.mark.parametrize("corpus,words", [("no/such/folder", "no/such/folder does not exist"),
                                          ("generated:0", "N >= 1"), ("generated:5:no/such.txt", "does not exist")])
def test_a_corpus_that_is_not_there_is_refused_before_any_model_loads(job, corpus, words, monkeypatch, capsys,
                                                                      tmp_path):
    """--corpus is checked at the door of every job (one check, `CorpusOptions`): one line, exit 2, no model read."""
    from lenses.commands import fit
    from lenses.commands import train as train_command
    from lenses.model import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    main = {"train": train_command.main, "fit": fit.main, "analyze": analyze.main}[job]
    extra = ["--view", "pos"] if job == "analyze" else []
    assert run_cli(main, ["--corpus", corpus, "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and err.startswith("error: --corpus"), err
    assert not (tmp_path / "out").exists()
