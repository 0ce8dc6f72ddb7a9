"""The package imports only downward (the layers contract in pyproject.toml), and modules import each
other at the top, where the contract sees them: function-level imports are kept for optional heavy
dependencies and the few named here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
# function-level imports of our own modules that stay, with the reason
ALLOWED_LATE = {
    "lenses/__main__.py": "`lenses --help` answers without importing torch",
    "lenses/analysis/__init__.py": "the explicit list of view modules, which import analysis.common",
    "lenses/analysis/common.py": "a view's plot, looked up by its name in the list of views",
}


def test_the_layers_contract_is_kept():
    run = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--config", str(ROOT / "pyproject.toml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "KEPT" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


def _late_imports(path: Path) -> list[int]:
    """Lines of ``path`` that import one of our modules inside a function or an ``if`` block (unseen by the contract
    when not counted, and hiding an order of layers)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    late = []
    for outer in ast.walk(tree):
        if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef, ast.If)):
            for node in ast.walk(outer):
                mod = node.module if isinstance(node, ast.ImportFrom) else None
                if isinstance(node, ast.ImportFrom) and (node.level or (mod or "").split(".")[0] == "lenses"):
                    late.append(node.lineno)
                elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "lenses" for a in node.names):
                    late.append(node.lineno)
    return sorted(set(late))


def test_our_modules_import_each_other_at_the_top():
    late = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "lenses").rglob("*.py"))
            if str(path.relative_to(ROOT)) not in ALLOWED_LATE for n in _late_imports(path)]
    assert not late, late


MAX_MODULE, MAX_FUNCTION = 400, 60  # lines: a module a newcomer reads at once, a function seen whole


def test_no_module_or_function_is_too_long():
    """No module in lenses/ (folders included) passes 400 lines, no function 60 (docstring included)."""
    import ast

    long = []
    for path in sorted((ROOT / "lenses").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE:
            long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION:
                    long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long, long


def test_the_independence_contract_lists_every_view():
    """A view added to the table of views is checked for independence too."""
    import tomllib

    from lenses.analysis import VIEWS

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    independent = next(c["modules"] for c in contracts if c["type"] == "independence")
    assert sorted(independent) == sorted(v.module.__name__ for v in VIEWS.values() if v.module)


def test_every_module_path_named_in_the_docs_and_docstrings_exists():
    """A name like `lenses.tracing.trace.trace` in backticks (docs, README, docstrings) resolves: a module moved
    or split leaves no pointer to where it was."""
    import importlib

    sources = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "lenses").rglob("*.py")]
    missing = []
    for path in sources:
        for ref in set(re.findall(r"`(lenses(?:\.\w+)+)`", path.read_text(encoding="utf-8"))):
            parts, obj, rest = ref.split("."), None, []
            for i in range(len(parts), 0, -1):
                try:
                    obj, rest = importlib.import_module(".".join(parts[:i])), parts[i:]
                    break
                except ImportError:
                    continue
            for name in rest:
                obj = getattr(obj, name, None)
            if obj is None:
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, missing
