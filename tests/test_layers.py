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


def test_our_modules_import_each_other_at_the_top():
    late = []
    for path in sorted((ROOT / "lenses").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(r"^\s+from \.", line) and rel not in ALLOWED_LATE and "TYPE_CHECKING" not in line:
                late.append(f"{rel}:{n}: {line.strip()}")
    late = [x for x in late if "from .models import ModelAdapter" not in x]  # vocab's type-checking import
    assert not late, late
