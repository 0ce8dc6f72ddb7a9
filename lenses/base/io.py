"""Atomic file writes: a crash or Ctrl-C mid-write never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from lenses.base.errors import LensesError, first_line

SIGNATURE = "lenses-toolkit"  # in every page (<meta name="generator">) and figure (its metadata) lenses writes
_OWNER: list[str | None] = [None]  # the run writing now (`owner`): signed into its pages and figures


@contextmanager
def owner(run: str | None):
    """Within this block, pages and figures are signed as written by ``run`` (a short id, `run_id`), so that a
    later run replaces only its own (`lenses.base.outdir.check_target`)."""
    old, _OWNER[0] = _OWNER[0], run
    try:
        yield run
    finally:
        _OWNER[0] = old


def current_owner() -> str | None:
    return _OWNER[0]


def run_id(kind: str, out: str | os.PathLike) -> str:
    """The id of a run: its kind and its resolved output folder (a re-run into the same folder is the same
    run; a run into another folder is another)."""
    import hashlib

    return hashlib.sha256(f"{kind}:{Path(out).resolve()}".encode("utf-8", "surrogatepass")).hexdigest()[:12]


def signature() -> str:
    """What a page or figure carries: `SIGNATURE`, and the run that wrote it where one is set."""
    return SIGNATURE + (f" run={_OWNER[0]}" if _OWNER[0] else "")


def cache_dir() -> Path:
    """Where lenses keeps what it can rebuild (dequantised GGUF copies, the pydocs corpus, crash logs
    without an output folder): ``$LENSES_CACHE``, else ``~/.cache/lenses``."""
    return Path(os.environ.get("LENSES_CACHE", Path.home() / ".cache" / "lenses"))


# The mark of an output folder (`lenses.base.outdir`): which kind of run made it, its state, and the manifest
# of every file lenses wrote there. `atomic_write` adds each file it writes to the manifest of the nearest
# marked folder that holds it (its own folder, else the one above), so only files lenses wrote are ever
# replaced, and a marked folder nested in another belongs to its own runs alone.
MARK = ".lenses-out"
TMP_SUFFIX = ".lenses.tmp"  # our temporary files (`atomic_write`): a killed writer's are removed, nobody else's


def read_mark(folder: str | os.PathLike) -> dict:
    """The mark of ``folder`` (empty when it has none or it is unreadable)."""
    try:
        data = json.loads((Path(folder) / MARK).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def update_mark(folder: str | os.PathLike, change: Callable[[dict], None]) -> dict:
    """Read ``folder``'s mark, apply ``change`` to it, and write it back atomically; return it."""
    folder = Path(folder)
    mark = read_mark(folder)
    change(mark)
    tmp = folder / f".{MARK}.{os.getpid()}{TMP_SUFFIX}"
    tmp.write_text(json.dumps(mark, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARK)
    return mark


def _record(path: Path) -> None:
    for folder in (path.parent, path.parent.parent):
        if (folder / MARK).is_file():
            rel = str(path.relative_to(folder))

            def add(mark, rel=rel):
                mark["files"] = sorted({*mark.get("files", []), rel})

            if rel not in read_mark(folder).get("files", []):
                update_mark(folder, add)
            return  # the nearest mark only


def _is_io_failure(e: BaseException) -> bool:
    """A writer library's own exception for a failed write (safetensors' ``SafetensorError`` on a full disk)."""
    text = str(e)
    return isinstance(e, Exception) and ("SafetensorError" in type(e).__name__ or any(
        w in text for w in ("No space left", "Read-only file system", "Disk quota", "Permission denied")))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the temporary file over ``path`` in one step."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise LensesError(
            f"cannot write to {path.parent}: {e.strerror}. Choose a writable output folder (--out)."
        ) from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) or _is_io_failure(e):  # disk full, read-only file system, quota: our error
            why = getattr(e, "strerror", None) or first_line(e, 160)
            raise LensesError(f"could not write {path}: {why}. Free some space or choose another output folder "
                              "(--out); nothing else was changed.") from e
        raise
    try:
        _record(path)
    except OSError:
        pass  # a folder whose mark cannot be updated only costs an --overwrite later
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
