"""The README is a door and the documentation site builds without a broken link or a missing page."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


CI_TESTS = ('bash scripts/setup.sh --model gemma-3-270m && .venv/bin/python -m pytest -q -m "not slow or ci" '
            "--durations=15")


def test_readme_is_a_door_that_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"the README has {len(lines)} lines; move detail to docs/"
    fence = lines.index("```bash")
    assert lines[fence + 1] == "bash scripts/setup.sh && .venv/bin/python analyze.py --view all --out out/"
    assert lines[fence + 2] == CI_TESTS
    assert fence <= 3  # first thing after the title
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # CI runs the README's test command
    assert CI_TESTS in ci


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#]+)\)", text)
    assert targets
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]
    assert not missing, missing


@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_every_page_is_in_the_site_and_the_strict_build_passes(tmp_path):
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if p not in nav] == []
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "TrainConfig" in api and "load_lens" in api  # the reference is generated from the docstrings


def _doc_tables():
    import importlib.util
    spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "scripts" / "doc_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measured_tables_are_the_files_the_measurements_wrote():
    tables = _doc_tables()
    assert tables.main(["--check"]) == 0, "a generated table was edited by hand or its data changed"
    pages = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md"))
    used = set(tables.MARK.findall(pages) and [m["name"] for m in tables.MARK.finditer(pages)])
    assert used == set(tables.TABLES), "every table the generator knows appears in a page"


def test_a_hand_edit_of_a_generated_table_is_caught():
    tables = _doc_tables()
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    row = next(ln for ln in page.splitlines() if ln.startswith("| SmolLM2-135M | ours (bfloat16)"))
    edited = page.replace(row, row.replace("|", "| 999 |", 2).replace("| 999 |", "|", 1))
    assert edited != page and tables.render(edited, "performance.md") == page
