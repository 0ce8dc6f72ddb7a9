"""Fuzzing both CLIs on a tiny model: random option values and random file contents.

The property: every command line ends with exit 0, or with exit 2 and exactly one ``error:`` line
on stderr (no traceback), and no file outside ``--out`` changes. Examples per CLI:
``LENSES_FUZZ_EXAMPLES`` (default 25; CI keeps the default, set e.g. 500 for a long hunt).
"""

from __future__ import annotations

import itertools
import os
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import snapshot
from tiny_models import tiny_inputs

from lenses.base.options import run_cli
from lenses.commands import analyze
from lenses.commands import train as train_probes

EXAMPLES = int(os.environ.get("LENSES_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COUNTER = itertools.count()
OUTCOMES: dict[str, int] = {}  # first words of each outcome, printed at the end with -s


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    inputs = tiny_inputs(root / "inputs")
    (root / "files").mkdir()
    (root / "outs").mkdir()
    _lenses_of_every_kind(inputs / "model", root / "lenses")
    return root


def _lenses_of_every_kind(model_dir, folder):
    """A tuned lens and a Jacobian lens without layer 0 (as fitted lenses are) for the tiny model."""
    from tiny_models import random_lens
    from transformers import AutoModelForCausalLM

    from lenses import JacobianLens
    from lenses.model.adapter import ModelAdapter

    adapter = ModelAdapter.from_model(AutoModelForCausalLM.from_pretrained(model_dir))
    random_lens(adapter).save_pretrained(folder / "tuned")
    g = torch.Generator().manual_seed(0)
    d = adapter.d_model
    mats = {k: torch.eye(d) + 0.05 * torch.randn(d, d, generator=g) for k in range(1, adapter.num_layers)}
    JacobianLens.from_matrices(mats, adapter.num_layers, model=adapter).save_pretrained(folder / "jlens")


numbers = st.one_of(st.integers(-3, 6), st.integers(-10**12, 10**12), st.sampled_from(["nan", "inf", "-0", "1e3",
                                                                                        "0.5", "1e-9", "x", ""]))
texts = st.text(alphabet=string.printable + "éß€\u200b", max_size=12)
contents = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'{"text": 3}', b'{"prompt": "a", "answer": 1}', b"GGUF\x03\x00",
                     b'{"prompt": "The quick", "answer": "brown"}\n', b"Q,a,b,c,d,A\n" * 6,
                     b'[{"requested_rewrite": {"prompt": "{}", "subject": 1}}]', b'{"single_hops": 5}']),
)
names = st.sampled_from(["x.txt", "x.jsonl", "x.csv", "x.gguf", "x.safetensors", "x.json", "dir"])


@st.composite
def a_file(draw, world):
    """A path to a fresh file (or folder) with random content."""
    name = draw(names)
    path = world / "files" / f"{next(COUNTER)}-{name}"
    if name == "dir":
        path.mkdir()
        (path / "config.json").write_bytes(draw(contents))
    else:
        path.write_bytes(draw(contents))
    return str(path)


def value_for(draw, world, kind):
    if kind == "num":
        return str(draw(numbers))
    if kind == "text":
        return draw(texts)
    return draw(a_file(world))


TRAIN_OPTIONS = {
    "--seq-len": "num", "--batch-size": "num", "--max-tokens": "num", "--optimizer": "text", "--lr": "num",
    "--momentum": "num", "--weight-decay": "num", "--clip": "num", "--seed": "num", "--eval-fraction": "num",
    "--max-eval-tokens": "num", "--checkpoint-every": "num", "--chunk-rows": "num", "--compute-dtype": "text",
    "--model-dtype": "text", "--device": "text", "--freq-alpha": "num", "--freq-topk": "num",
    "--freq-keep-prob": "num", "--freq-type-cap": "num", "--freq-token": "text", "--corpus": "file",
    "--frequencies": "file", "--model": "file", "--layers": "text", "--final-norm": "text", "--unembed": "text",
    "--steps": "small",
}
ANALYZE_OPTIONS = {
    "--view": "view", "--lens": "lens", "--prompt": "text", "--top-k": "num", "--num-positions": "num",
    "--num-texts": "num", "--num-facts": "num", "--num-questions": "num", "--num-prompts": "num",
    "--prompt-tokens": "num", "--alpha": "num", "--hist-layer": "num", "--corpus": "file", "--facts": "file",
    "--mcq": "file", "--frequencies": "file", "--model": "file", "--device-map": "text", "--seed": "num",
    "--html": "file", "--png": "file", "--color": "text", "--tasks": "file", "--num-pairs": "num",
    "--positions": "text", "--skip-positions": "num", "--skip-mode": "text",
}


@st.composite
def command(draw, world, options, base):
    argv = list(base)
    for option in draw(st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True)):
        kind = options[option]
        if kind == "small":
            value = str(draw(st.integers(-2, 3)))
        elif kind == "lens":  # every lens kind the model has, alone and together, or a random file
            lenses = world / "lenses"
            tuned, jlens = lenses / "tuned", lenses / "jlens"
            value = draw(st.sampled_from(["logit", "auto", "tuned", "jacobian", "both", f"{tuned}", f"jacobian:{jlens}",
                                          f"logit,{tuned},{jlens}", f"a:{jlens},b:{jlens}", "FILE"]))
            value = value_for(draw, world, "file") if value == "FILE" else value
        elif kind == "view":
            value = draw(st.sampled_from(["frequency", "pos", "facts", "mcq", "representation", "all", "bogus",
                                          "early-exit", "patching", "layer-skip"]))
        else:
            value = value_for(draw, world, kind)
        argv += [option, value] if value.startswith("-") is False or value == "" else [f"{option}={value}"]
    return argv


def check(main, argv, world, capsys):
    before = snapshot(world / "inputs")
    rc = run_cli(main, argv)  # anything but our errors escapes here and fails the test
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert rc in (0, 2), (rc, argv, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if rc == 2:
        assert len(errors) == 1, (argv, err)
    key = "exit 0" if rc == 0 else " ".join(errors[0].split()[:4])
    OUTCOMES[key] = OUTCOMES.get(key, 0) + 1
    assert snapshot(world / "inputs") == before, argv


def train_base(inputs, out):
    return ["--model", str(inputs / "model"), "--corpus", str(inputs / "corpus.txt"), "--no-progress", "--steps", "2",
            "--seq-len", "16", "--batch-size", "2", "--max-eval-tokens", "32", "--out", str(out)]


def analyze_base(inputs, out):
    return ["--model", str(inputs / "model"), "--lens", "logit", "--no-progress", "--view", "facts", "--facts",
            str(inputs / "facts.jsonl"), "--mcq", str(inputs / "mcq.csv"), "--corpus", str(inputs / "corpus.txt"),
            "--num-positions", "6", "--num-texts", "3", "--num-questions", "2", "--num-prompts", "3",
            "--prompt-tokens", "8", "--out", str(out)]


@pytest.mark.usefixtures("eager_kl")
def analyze_base_all_lenses(inputs, out):
    lenses = inputs.parent / "lenses"
    base = analyze_base(inputs, out)
    base[base.index("--lens") + 1] = f"logit,{lenses / 'tuned'},{lenses / 'jlens'}"
    return base


@pytest.mark.parametrize("main,options,base", [(train_probes.main, TRAIN_OPTIONS, train_base),
                                               (analyze.main, ANALYZE_OPTIONS, analyze_base),
                                               (analyze.main, ANALYZE_OPTIONS, analyze_base_all_lenses)],
                         ids=["train_probes", "analyze", "analyze-every-lens-kind"])
@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_fuzz_cli(world, capsys, main, options, base):
    @FUZZ
    @given(data=st.data())
    def run(data):
        out = world / "outs" / str(next(COUNTER))
        check(main, data.draw(command(world, options, base(world / "inputs", out))), world, capsys)

    run()
    print(f"\n{main.__module__} outcomes:", sorted(OUTCOMES.items(), key=lambda kv: -kv[1]))
    OUTCOMES.clear()
