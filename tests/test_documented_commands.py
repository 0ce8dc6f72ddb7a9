"""Every command the README, the docs and ``--help`` print runs.

The commands are extracted from the text (fenced ``bash`` blocks line by line, inline code spans
whole), never listed by hand, so a command added to the docs is tested without anyone asking. Each
runs on a tiny model (and tiny counts) with every lens kind the model has: the logit lens, a tuned
lens and a Jacobian lens without layer 0 (``runs/demo`` and ``runs/jlens``, made first). Each must exit
0. Placeholders (``path/to/model``, ``my_texts/``, ``my_facts.jsonl``, ``prompts.txt``) stand for
tiny files of the right kind; ``tuned`` / ``jacobian`` / ``both`` (the lenses shipped for the default
model) stand for the tiny model's own lenses. The slow tier runs the grid command as documented on the
default model with its three shipped lenses (the command that crashed).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import TEXT, tiny_inputs

from lenses.base.options import run_cli
from lenses.commands import analyze, fit
from lenses.commands import train as train_probes

ROOT = Path(__file__).parent.parent
SCRIPTS = {"analyze.py": analyze, "train_probes.py": train_probes, "lenses fit": fit}
COMMAND = re.compile(r"(?:(?:\.venv/bin/)?python\s+|(?:torchrun|accelerate launch)(?:\s+(?!train_probes|-m\b)\S+)*?\s+)"
                     r"(analyze\.py|train_probes\.py|-m lenses fit)\b[^\n`]*"
                     r"|(?:(?:\.venv/bin/)?python -m |\.venv/bin/|(?<![\w/.-]))lenses (?:train|fit|analyze)\b[^\n`]*")
JOBS = {"train": "train_probes.py", "analyze": "analyze.py", "fit": "lenses fit"}  # `lenses <job>` runs these
# Documented commands that cannot run on one machine, with the reason (everything else must run).
NOT_HERE = {"--num_machines": "needs several machines (HOST, machine rank R)",
            "--nnodes": "two node agents: tests/test_sharding.py runs them on loopback"}


def _sources() -> dict[str, str]:
    """Where commands are printed: the README, the docs pages and each CLI's --help text."""
    texts = {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    for page in sorted((ROOT / "docs").rglob("*.md")):
        texts[str(page.relative_to(ROOT))] = page.read_text(encoding="utf-8")
    for name, module in SCRIPTS.items():
        texts[f"{name} --help"] = module.__doc__
    return texts


def _commands_in(text: str) -> list[str]:
    found = []
    fences = re.findall(r"^```([\w-]*)\n(.*?)^```", text, flags=re.S | re.M)
    for lang, block in fences:
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        found += [m.group(0) for line in block.replace("\\\n", " ").splitlines() for m in COMMAND.finditer(line)]
    rest = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`]+)`", rest):
        found += [m.group(0) for m in COMMAND.finditer(" ".join(span.split()))]
    if not fences and "\n    python" in text:  # a --help text: one command per indented line
        found += [m.group(0) for line in text.splitlines() for m in COMMAND.finditer(line)]
    return found


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every distinct command, comment and ``[...]`` brackets removed."""
    seen, out = set(), []
    for where, text in _sources().items():
        for cmd in _commands_in(text):
            cmd = cmd.split(" #")[0].replace("[", "").replace("]", "").replace(" ...", "").strip()
            cmd = re.sub(r"^\.venv/bin/(python )?", lambda m: "python " if m.group(1) else "", cmd)
            cmd = cmd.replace("--nproc_per_node N ", "--nproc_per_node 2 ")
            if cmd not in seen:
                seen.add(cmd)
                out.append((where, cmd))
    return out


COMMANDS = documented_commands()


def test_the_docs_print_commands_of_every_kind():
    """The extraction itself can fail: the README's two first-line jobs and both CLIs' examples are found."""
    cmds = [c for _, c in COMMANDS]
    assert "python analyze.py --view all --out out/" in cmds
    assert any(c.startswith("lenses fit") for c in cmds) and any(c.startswith("python train_probes.py") for c in cmds)
    assert any("--prompt" in c for c in cmds) and any(c.startswith("torchrun") for c in cmds)
    assert len(cmds) >= 15, cmds


# --------------------------------------------------------------------------- running them on a tiny model

TRAIN_TINY = {"--seq-len": "32", "--batch-size": "2", "--max-tokens": "128", "--steps": "2", "--max-eval-tokens": "64"}
FIT_TINY = {"--num-prompts": "2", "--seq-len": "24", "--skip-first": "2", "--min-chars": "20", "--eval-tokens": "64",
            "--dim-batch": "8"}
VIEW_TINY = {"--num-positions": "16", "--num-texts": "3", "--num-facts": "2", "--num-questions": "4",
             "--num-prompts": "3", "--prompt-tokens": "16", "--num-pairs": "1", "--skip-positions": "8",
             "--act-positions": "16", "--act-layers": "2", "--num-swaps": "2", "--num-items": "4", "--fidelity-k": "1"}
ALL_LENSES = "logit,tuned:runs/demo,jacobian:runs/jlens"  # every kind the tiny model has (J-lens: no layer 0)
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs standing for the docs' placeholders, and a tuned lens and a J-lens of the tiny model."""
    root = tmp_path_factory.mktemp("documented")
    inputs = tiny_inputs(root / "inputs", letters=True)  # " A" .. " D" are single tokens, as the MCQ view needs
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(inputs / "model")  # a chat template, for --corpus generated:N (the
    tok.chat_template = CHAT_TEMPLATE  # model's name says no instruct/chat: `--chat-template auto` stays off)
    tok.save_pretrained(inputs / "model")
    (inputs / "my_texts").mkdir()
    for i in range(4):
        (inputs / "my_texts" / f"doc{i}.txt").write_text(TEXT, encoding="utf-8")
    (inputs / "prompts.txt").write_text("\n".join(f"The quick brown fox number {i} jumps over the dog." for i in
                                                  range(4)) + "\n", encoding="utf-8")
    for name, labels in (("task_ab", [" A", " B"]), ("task_cd", [" C", " D"])):  # single tokens of this tokenizer
        rows = [json.dumps({"prompt": f"Item {i} of {name}: pick one:", "labels": labels, "answer": labels[i % 2]})
                for i in range(4)]
        (inputs / f"{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (inputs / "my_facts.jsonl").write_text('{"prompt": "The quick brown fox", "answer": "jumps"}\n'
                                           '{"prompt": "The lazy", "answer": "dog"}\n', encoding="utf-8")
    _capture_states(inputs)
    lenses = root / "lenses"
    model, corpus = str(inputs / "model"), str(inputs / "corpus.txt")
    args = ["--model", model, "--corpus", corpus, "--no-progress"]
    assert run_cli(train_probes.main, ["--out", str(lenses / "runs/demo"), *args, *_flat(TRAIN_TINY)]) == 0
    assert run_cli(fit.main, ["--out", str(lenses / "runs/jlens"), *args,
                                       *_flat(FIT_TINY)]) == 0
    return root


def _capture_states(inputs: Path) -> None:
    """``states.safetensors`` (the default prompt) and ``facts_states/`` (each of my_facts.jsonl's prompts): the
    tiny model's states as transformers' ``output_hidden_states`` gives them, for the ``--states`` commands."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lenses.analysis.config import AnalysisConfig
    from lenses.analysis.facts import fact_items
    from lenses.text import convention

    model = AutoModelForCausalLM.from_pretrained(inputs / "model").eval()
    tok = AutoTokenizer.from_pretrained(inputs / "model")

    def captured(ids) -> dict:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(ids)]), output_hidden_states=True)
        return {"hidden_states": torch.stack(out.hidden_states)[:, 0].contiguous(), "input_ids": torch.tensor(ids),
                "logits": out.logits[0].contiguous()}

    save_file(captured(convention.encode(tok, AnalysisConfig().prompt)), inputs / "states.safetensors")
    facts = [json.loads(line) for line in (inputs / "my_facts.jsonl").read_text().splitlines()]
    (inputs / "facts_states").mkdir()
    for k, item in enumerate(fact_items(tok, facts, False, None)[0]):
        save_file(captured(item.ids), inputs / "facts_states" / f"fact{k}.safetensors")


def _flat(options: dict) -> list[str]:
    return [x for kv in options.items() for x in kv]


def adapt(cmd: str, world: Path) -> list[str]:
    """The documented command as it runs on the tiny model: placeholders replaced, tiny counts added
    (only where the command does not set them), every lens kind where it reads the default lenses."""
    inputs = world / "inputs"
    words = shlex.split(cmd)
    if "lenses" in words and words[words.index("lenses") + 1] in JOBS:  # `lenses <job>`, `python -m lenses <job>`
        job = words[words.index("lenses") + 1]
        words = [JOBS[job], *words[words.index("lenses") + 2:]]
    script = next(w for w in words if w in SCRIPTS)
    argv = words[words.index(script) + 1:]
    swap = {"path/to/model": str(inputs / "model"), "path/or/file.gguf": str(inputs / "model"),
            "my_texts/": str(inputs / "my_texts"), "texts/": str(inputs / "my_texts"),
            "prompts.txt": str(inputs / "prompts.txt"), "my_facts.jsonl": str(inputs / "my_facts.jsonl"),
            "states.safetensors": str(inputs / "states.safetensors"), "facts_states/": str(inputs / "facts_states")}
    argv = [swap.get(a, a) for a in argv]
    # the model's own chat transcripts: three, prompted from the tiny texts (sizes decide how long, not whether)
    argv = [f"generated:3:{inputs / 'my_texts'}" if a.startswith("generated:") else a for a in argv]
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    lens_words = {"tuned": "logit,tuned:runs/demo", "both": "logit,tuned:runs/demo", "jacobian": "jacobian:runs/jlens",
                  "auto": ALL_LENSES}
    if "--lens" in argv:
        i = argv.index("--lens") + 1
        argv[i] = ",".join(lens_words.get(p, p) for p in argv[i].split(","))
    elif script == "analyze.py":
        argv += ["--lens", ALL_LENSES]
    extra = {"--model": str(inputs / "model")}
    if "--corpus" not in given:
        extra["--corpus"] = str(inputs / "corpus.txt")
    if script == "train_probes.py":
        extra.update(TRAIN_TINY)
    elif script == "lenses fit":
        extra.update(FIT_TINY)
    else:  # the tiny counts of the settings its views read (one no view reads is a note)
        from lenses.analysis import VIEWS, selected

        view = argv[argv.index("--view") + 1] if "--view" in argv else None
        read = {f"--{k.replace('_', '-')}" for n in selected(view) for k in VIEWS[n].settings}
        extra = {k: v for k, v in extra.items() if k != "--corpus" or k in read}
        extra.update({k: v for k, v in VIEW_TINY.items() if k in read})
        if {"causal", "patching"} & set(argv) and "--tasks" not in given:  # the shipped tasks' labels are
            extra["--tasks"] = f"{inputs / 'task_ab.jsonl'},{inputs / 'task_cd.jsonl'}"  # words: several bytes
    if "--model" in given:
        argv[argv.index("--model") + 1] = str(inputs / "model")
    for k, v in extra.items():  # tiny sizes replace the documented ones (sizes decide how long, not whether)
        if v is None:
            argv += [k] if k not in given else []
        elif k in argv and k != "--corpus":
            argv[argv.index(k) + 1] = v
        elif k not in given:
            argv += [k, v]
    return [script, *argv, "--no-progress"]


def _cwd_for(script: str, world: Path, tmp_path: Path) -> Path:
    """A fresh folder; analysis commands find the tiny model's lenses under runs/."""
    if script == "analyze.py":
        shutil.copytree(world / "lenses", tmp_path, dirs_exist_ok=True)
    return tmp_path


def _tier(where: str, cmd: str):
    """Commands that start several processes run in the full suite only (the slow tier)."""
    marks = [pytest.mark.slow] if cmd.startswith(("torchrun", "accelerate")) else []
    return pytest.param(where, cmd, marks=marks, id=f"{where}: {cmd}"[:90])


@pytest.mark.parametrize("where,cmd", [_tier(w, c) for w, c in COMMANDS])
def test_documented_command_runs_on_a_tiny_model(where, cmd, world, tmp_path, monkeypatch, capsys, eager_kl):
    reason = next((why for flag, why in NOT_HERE.items() if flag in cmd), None)
    if reason:
        pytest.skip(reason)
    argv = adapt(cmd, world)
    cwd = _cwd_for(argv[0], world, tmp_path)
    if cmd.startswith(("torchrun", "accelerate")):
        nproc = re.search(r"(?:--nproc_per_node|--num_processes)\s+(\d+)", cmd).group(1)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        target = ["-m", "lenses", "fit"] if argv[0] == "lenses fit" else [str(ROOT / argv[0])]
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc,
                              *target, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"{where}: {cmd}\n{run.stderr[-3000:]}"
        return
    monkeypatch.chdir(cwd)
    try:
        rc = run_cli(SCRIPTS[argv[0]].main, argv[1:])
    except SystemExit as e:  # --help
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 0, f"{where}: {cmd}\nran as: {' '.join(argv)}\n{err[-3000:]}"
    assert "Traceback" not in err


@pytest.mark.slow
def test_readme_grid_command_on_the_default_model_with_its_three_lenses(tmp_path, monkeypatch, capsys):
    """The README's grid command, as printed, with --lens auto: the shipped tuned lens and the shipped
    Jacobian lens (no layer 0) next to the logit lens."""
    cmd = next(c for _, c in COMMANDS if c.startswith("python analyze.py --prompt") and "--html" in c)
    monkeypatch.chdir(tmp_path)
    rc = run_cli(analyze.main, shlex.split(cmd)[2:] + ["--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    table = __import__("lenses.pages.grid", fromlist=["read_grid"]).read_grid(tmp_path / "out" / "lens_grid.csv")
    assert set(table.lens) == {"logit", "tuned", "jacobian"}
    missing = table[(table.lens == "jacobian") & (table.layer == 0)]
    assert len(missing) and missing.prob_1.isna().all() and (missing.token_1 == "").all()
    assert (tmp_path / "out" / "lens.html").exists() and (tmp_path / "out" / "lens.png").exists()


def test_train_method_jacobian_still_fits_for_one_release_and_says_so(world, tmp_path, capsys, eager_kl):
    """``train_probes.py --method jacobian`` runs `lenses fit` (the same lens) with a one-line deprecation note."""
    inputs = world / "inputs"
    args = ["--model", str(inputs / "model"), "--corpus", str(inputs / "corpus.txt"), "--no-progress", *_flat(FIT_TINY)]
    assert run_cli(train_probes.main, ["--method", "jacobian", "--out", str(tmp_path / "old"), *args]) == 0
    assert capsys.readouterr().err.count("--method jacobian is deprecated") == 1
    assert run_cli(fit.main, ["--out", str(tmp_path / "new"), *args]) == 0
    old, new = (tmp_path / d / "translators.safetensors" for d in ("old", "new"))
    assert old.read_bytes() == new.read_bytes()
