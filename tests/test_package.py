"""The wheel carries the ``lenses`` command, the shipped lenses and the data sets, and runs from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow  # several processes or a kill and resume: the full suite runs it
def test_the_wheel_installs_the_command_the_lenses_and_the_data(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("lenses-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "lenses").rglob("*")
               if p.is_file() and p.parts[-2:-1] != ("__pycache__",)}
    missing = sorted(n for n in shipped if n not in names and not n.endswith(".pyc"))
    assert not missing, f"files of the package missing from the wheel: {missing}"
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cmd in ([str(target / "bin" / "lenses"), "--help"], [sys.executable, "-m", "lenses", "analyze", "--help"]):
        run = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "usage: lenses" in run.stdout, run.stderr[-2000:]
    where = subprocess.run([sys.executable, "-c", "import lenses, lenses.kinds.registry as r; print(lenses.__file__); "
                            "print(r.available())"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert str(target) in where.stdout and "smollm2-135m-instruct-jacobian" in where.stdout, where.stderr
