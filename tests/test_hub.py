"""Lenses by hub id, read from a Hugging Face cache folder the test builds (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import random_lens, tiny_adapter

from lenses.jobs.jlens_estimator import fit_prompts
from lenses.kinds.hub import JACOBIAN_LENSES, jacobian_file
from lenses.kinds.load import export_tuned_lens

SHA = "0123456789abcdef0123456789abcdef01234567"


def _snapshot(cache: Path, kind: str, repo: str) -> Path:
    """The folder layout huggingface_hub uses: <kind>s--<owner>--<name>/{refs/main, snapshots/<sha>/...}."""
    root = cache / f"{kind}s--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(SHA)
    return root / "snapshots" / SHA


def _run_offline(script: str, cache: Path):
    """Run ``script`` (which saves its findings to ``sys.argv[1]``) in a fresh process reading only the hub
    cache ``cache`` (HF_HUB_OFFLINE=1); return the process and what it saved."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache / "home")}
    proc = subprocess.run([sys.executable, "-c", script, str(cache / "out.pt")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, torch.load(cache / "out.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_hub_ids_resolve_through_the_offline_cache(tmp_path):
    adapter = tiny_adapter("gpt2")
    jlens = fit_prompts(adapter, [torch.randint(1, 90, (20,), generator=torch.Generator().manual_seed(0))])
    file = _snapshot(tmp_path, "model", "neuronpedia/jacobian-lens") / jacobian_file("gpt2-small")
    file.parent.mkdir(parents=True)
    jlens.save_published(file)
    tuned = random_lens(adapter)
    export_tuned_lens(tuned, _snapshot(tmp_path, "space", "AlignmentResearch/tuned-lens") / "lens" / "gpt2")
    script = (
        "import sys, torch\n"
        "from lenses import load_lens\n"
        "from lenses.base.errors import LensesError\n"
        "a = load_lens('neuronpedia/jacobian-lens:gpt2-small')\n"
        "b = load_lens('neuronpedia/jacobian-lens:openai-community/gpt2')\n"
        "t = load_lens('AlignmentResearch/tuned-lens:gpt2')\n"
        "torch.save({'a': a.matrices, 'b': b.matrices, 'layers': a.layers, 'w': t.weight}, sys.argv[1])\n"
        "try:\n"
        "    load_lens('neuronpedia/jacobian-lens:qwen3-4b')\n"
        "except LensesError as e:\n"
        "    print('ERROR', e)\n"
    )
    proc, got = _run_offline(script, tmp_path)
    assert got["layers"] == jlens.layers == [1, 2]
    torch.testing.assert_close(got["a"], jlens.matrices.half().float())
    torch.testing.assert_close(got["b"], got["a"])
    torch.testing.assert_close(got["w"], tuned.weight.detach())
    assert "ERROR" in proc.stdout and "not in the local Hugging Face cache" in proc.stdout


def test_known_published_lenses():
    assert len(JACOBIAN_LENSES) == 37
    path = "llama3.1-8b/jlens/Salesforce-wikitext/Llama-3.1-8B_jacobian_lens.pt"
    assert jacobian_file("meta-llama/Llama-3.1-8B") == jacobian_file("llama3.1-8b") == path


@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_any_repository_revision_and_subfolder(tmp_path):
    """``owner/repo[@revision]:subfolder``: community lenses kept one per subfolder, at a branch or commit."""
    adapter = tiny_adapter("gpt2")
    main = random_lens(adapter, seed=1)
    main.save_pretrained(_snapshot(tmp_path, "model", "someone/community-lenses") / "gpt2" / "tiny")
    other_sha = "fedcba9876543210fedcba9876543210fedcba98"
    root = tmp_path / "models--someone--community-lenses"
    (root / "refs" / "v2").write_text(other_sha)
    v2 = random_lens(adapter, seed=2)
    v2.save_pretrained(root / "snapshots" / other_sha / "gpt2" / "tiny")
    file = _snapshot(tmp_path, "model", "neuronpedia/jacobian-lens") / jacobian_file("gpt2-small")
    file.parent.mkdir(parents=True)
    fit_prompts(adapter, [torch.randint(1, 90, (20,), generator=torch.Generator().manual_seed(0))]).save_published(file)
    script = (
        "import sys, torch\n"
        "from lenses import load_lens\n"
        "from lenses.base.errors import LensesError\n"
        "a = load_lens('someone/community-lenses:gpt2/tiny')\n"
        "b = load_lens('someone/community-lenses@v2:gpt2/tiny')\n"
        f"c = load_lens('someone/community-lenses@{other_sha}:gpt2/tiny')\n"
        f"j = load_lens('neuronpedia/jacobian-lens@{SHA}:gpt2-small')\n"
        "torch.save({'a': a.weight, 'b': b.weight, 'c': c.weight, 'j': j.layers}, sys.argv[1])\n"
        "for bad in ('someone/community-lenses:gpt2/none', 'someone/community-lenses@v9:gpt2/tiny'):\n"
        "    try:\n"
        "        load_lens(bad)\n"
        "    except LensesError as e:\n"
        "        print('ERROR', e)\n"
    )
    proc, got = _run_offline(script, tmp_path)
    torch.testing.assert_close(got["a"], main.weight.detach())
    torch.testing.assert_close(got["b"], v2.weight.detach())
    torch.testing.assert_close(got["c"], v2.weight.detach())
    assert got["j"] == [1, 2] and proc.stdout.count("ERROR") == 2
