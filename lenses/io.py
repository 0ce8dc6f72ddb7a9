"""Atomic file writes: a crash or Ctrl-C mid-write never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import LensesError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the temporary file over ``path`` in one step."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise LensesError(
            f"cannot write to {path.parent}: {e.strerror}. Choose a writable output folder (--out)."
        ) from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Fail before hours of work, not after, if ``folder`` cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise LensesError(f"cannot write to {folder}: {e.strerror}. Choose a writable output folder (--out).") from e
    return folder


def write_text(path: str | os.PathLike, text: str) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, _write)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike, df) -> Path:
    """Write a pandas DataFrame as CSV, atomically. Strings are always quoted, so tokens holding a
    carriage return, a comma or a quote read back intact (`pandas.read_csv` reads them unchanged)."""
    import csv

    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC))
