"""Output folders that never destroy what they did not make.

`claim` is how every run takes its ``--out`` folder:

- a folder that does not exist, or is empty, is created and marked as ours (``.lenses-out``, which
  records the kind of run: ``train`` or ``analysis``);
- a non-empty folder without our mark (a model folder, your data, ...) is refused, naming what is
  there; so is a folder made by another kind of run;
- a training folder that holds a finished lens or an interrupted run is refused unless the user
  says ``--resume`` (continue it) or ``--overwrite`` (replace it);
- a lock (``.lenses-lock``, holding the writer's pid and host) is held for the run's lifetime: a
  second run into the same folder is refused while the first lives; the lock of a dead process is
  taken over with a notice;
- once the lock is ours, any temporary file (``.*.tmp``) left by a killed writer is removed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from .errors import LensesError

MARK = ".lenses-out"
LOCK = ".lenses-lock"
IGNORED = {MARK, LOCK, ".write-test"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class OutputFolder:
    """A claimed output folder; use as a context manager (releases the lock on exit)."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind, self.locked = path, kind, False

    def _lock(self) -> None:
        lock = self.path / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_json(lock)
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                    print(f"note: taking over the lock of {self.path} from process {pid}, which no longer runs",
                          file=sys.stderr)
                    lock.unlink(missing_ok=True)
                    continue
                if not holder:  # a lock being written right now, or an unreadable one
                    raise LensesError(f"{self.path} is locked ({lock} exists): another run is writing there. "
                                      f"Wait for it, choose another --out, or delete {lock} if no run is using it.")
                raise LensesError(f"another run (process {pid} on {host}) is writing to {self.path}; wait for it "
                                  "to finish or choose another --out.")
            except OSError as e:
                raise LensesError(f"cannot write to {self.path}: {e.strerror}. Choose a writable output folder "
                                  "(--out).") from e
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.locked = True
            return
        raise LensesError(f"could not take the lock {lock}; delete it if no run is using {self.path}.")

    def _clean_temporaries(self) -> None:
        for tmp in self.path.glob(".*.tmp"):
            try:
                tmp.unlink()
                print(f"note: removed {tmp.name}, left by a writer that was killed", file=sys.stderr)
            except OSError:
                pass

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def release(self) -> None:
        if self.locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self.locked = False


def claim(out: str | os.PathLike, kind: str, resume: bool = False, overwrite: bool = False,
          finished: tuple[str, ...] = (), interrupted: tuple[str, ...] = ()) -> OutputFolder:
    """Take ``out`` for a run of ``kind`` (see the module docstring). ``finished``/``interrupted``:
    file names that mean a finished result / a resumable run of this kind is there."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise LensesError(f"--out {path} is a file, not a folder; choose a folder path.")
    content = sorted(p.name for p in path.iterdir() if p.name not in IGNORED) if path.is_dir() else []
    mark = _read_json(path / MARK)
    legacy = any((path / name).exists() for name in interrupted)  # runs of earlier versions had no mark
    if content and mark.get("kind") != kind and not (legacy and not mark):
        what = f"a {mark['kind']} run's output" if mark.get("kind") else ", ".join(content[:5]) + (
            ", ..." if len(content) > 5 else "")
        raise LensesError(f"--out {path} is not empty and was not made by a {kind} run of lenses (it holds {what}); "
                          "nothing was changed. Choose a new or empty folder for --out.")
    has_run = [n for n in interrupted if (path / n).exists()]
    has_result = [n for n in finished if (path / n).exists()]
    if not resume and not overwrite and (has_run or has_result):
        if has_result:
            raise LensesError(f"--out {path} already holds a finished result ({', '.join(has_result)}); pass "
                              "--overwrite to replace it, --resume to re-use it, or choose another --out.")
        raise LensesError(f"--out {path} holds an interrupted run ({', '.join(has_run)}): pass --resume to "
                          "continue it, --overwrite to start afresh, or choose another --out.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        folder = OutputFolder(path, kind)
        folder._lock()
        if not mark:
            (path / MARK).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")
    except OSError as e:
        raise LensesError(f"cannot write to {path}: {e.strerror}. Choose a writable output folder (--out).") from e
    folder._clean_temporaries()
    if overwrite and not resume:
        for name in interrupted:
            (path / name).unlink(missing_ok=True)
    return folder
