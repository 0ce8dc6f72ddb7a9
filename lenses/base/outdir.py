"""Output folders and files that never destroy what they did not make.

`claim` is how every run takes its ``--out`` folder. The folder's mark (``.lenses-out``, JSON) says
which kind of run made it (``train``, ``jacobian``, ``analysis``, ``experiment``), the run's state
(``running``, ``interrupted``, ``finished``) and the **manifest**: every file the runs wrote there.
Every file lenses writes goes through `lenses.base.io.atomic_write`, which reports it here, so the
manifest is complete by construction.

- a folder that does not exist, or is empty, is created and marked as ours;
- a folder holding anything that is not in its manifest (a model folder, your data, a file someone
  put there, ...) is refused, with or without ``--overwrite``, naming those files: a folder is never
  adopted because of a file's name;
- a folder made by another kind of run is refused, naming the kind;
- a training folder whose run finished is refused unless ``--overwrite`` (``--resume`` over a
  finished result is refused: there is nothing to continue); an interrupted run needs ``--resume``
  or ``--overwrite``; ``--overwrite`` deletes only the files in the manifest;
- a lock (``.lenses-lock``, holding the writer's pid and host) is held for the run's lifetime: a
  second run into the same folder is refused while the first lives; the lock of a dead process is
  taken over with a notice (its run is then ``interrupted``);
- once the lock is ours, any temporary file of ours (``.*.lenses.tmp``) left by a killed writer is
  removed (a ``.draft.tmp`` of yours is not ours);
- a lock that is empty or unreadable for more than `STALE_LOCK_S` seconds (a start that failed while
  writing it, e.g. on a full disk) is taken over with a notice; a start that fails removes its lock.

`check_target` is the same rule for a single file given by path (``--html``, ``--png``, a save
function's target): an existing file is replaced only if lenses wrote it (it is in a manifest, or
carries our signature) or with ``overwrite=True``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import sys
from pathlib import Path

from lenses.base import io
from lenses.base.errors import LensesError

MARK = io.MARK
LOCK = ".lenses-lock"
IGNORED = {MARK, LOCK, ".write-test"}
ALWAYS_OURS = ("crash-*.log", f".*{io.TMP_SUFFIX}")  # crash logs (base.options), temporary files of atomic writes
SIGNATURE = io.SIGNATURE
STALE_LOCK_S = 10.0  # an empty lock older than this was left by a failed start, not being written now


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs. A killed process that nobody has reaped yet (a zombie: in
    containers whose first process does not reap, it stays one) holds no lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _stale(lock: Path) -> bool:
    import time

    try:
        return time.time() - lock.stat().st_mtime > STALE_LOCK_S
    except OSError:
        return False


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


read_mark = io.read_mark


def _content(path: Path) -> list[str]:
    """Every file under ``path`` (relative, sorted), our mark and lock left out, and the files of nested marked
    folders too: those belong to their own runs (an experiment's variants, an analysis inside a run folder)."""
    if not path.is_dir():
        return []
    nested = {m.parent for m in path.rglob(MARK) if m.parent != path}
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.is_file() and p.name not in IGNORED and not nested.intersection(p.parents))


class OutputFolder:
    """A claimed output folder; use as a context manager (releases the lock on exit, marking the run
    ``interrupted`` unless `finish` was called). The mark lives on disk (`lenses.base.io.update_mark`): every
    file written through `lenses.base.io.atomic_write` is added to its manifest as it is written."""

    def __init__(self, path: Path, kind: str, mark: dict, owned: tuple[str, ...] = ()):
        self.path, self.kind, self.locked, self.owned = path, kind, False, owned
        self.mark = {**mark, "kind": kind, "files": sorted(set(mark.get("files", [])))}

    # ---- the mark
    def _save_mark(self) -> None:
        """Write the mark as claimed (the manifest of what is there, the kind, the state)."""
        self.mark = io.update_mark(self.path, lambda m: (m.clear(), m.update(self.mark)))

    @property
    def files(self) -> list[str]:
        return io.read_mark(self.path).get("files", [])

    def set_state(self, state: str, **extra) -> None:
        self.mark = io.update_mark(self.path, lambda m: m.update(state=state, **extra))

    def finish(self, **extra) -> None:
        """Mark the run finished (``extra``: anything to record with it)."""
        self.set_state("finished", **extra)

    def ours(self, rel: str) -> bool:
        name = Path(rel).name
        return rel in self.mark["files"] or any(fnmatch.fnmatch(name, p) for p in ALWAYS_OURS + self.owned)

    def forget(self, names) -> None:
        """Delete files of the manifest (``--overwrite``); nothing outside it is touched."""
        names = [rel for rel in names if rel in self.files or any(fnmatch.fnmatch(Path(rel).name, p)
                                                                    for p in self.owned)]
        for rel in names:
            (self.path / rel).unlink(missing_ok=True)
        self.mark = io.update_mark(self.path, lambda m: m.update(files=[f for f in m.get("files", [])
                                                                       if f not in names]))

    # ---- the lock
    def _lock(self) -> bool:
        """Take the lock; return whether a dead process's lock was taken over."""
        lock = self.path / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        took_over = False
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
                    took_over = True
                    continue
                if not holder and _stale(lock):
                    print(f"note: taking over the lock of {self.path}: it is empty (left by a start that failed)",
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
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError as e:  # e.g. the disk is full: no lock stays behind to block the next run
                lock.unlink(missing_ok=True)
                raise LensesError(f"cannot write to {self.path}: {e.strerror}. Free some space or choose another "
                                  "--out.") from e
            self.locked = True
            return took_over
        raise LensesError(f"could not take the lock {lock}; delete it if no run is using {self.path}.")

    def _clean_temporaries(self) -> None:
        for tmp in self.path.glob(f".*{io.TMP_SUFFIX}"):
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
            if io.read_mark(self.path).get("state") == "running":
                try:
                    self.set_state("interrupted")
                except OSError:
                    pass
            try:
                (self.path / LOCK).unlink(missing_ok=True)
            except OSError as e:  # the folder turned read-only: say so, and let the run's own error through
                print(f"note: could not remove the lock {self.path / LOCK} ({e.strerror}); delete it before the next "
                      "run into this folder.", file=sys.stderr)
            self.locked = False


def _refuse_if_running(path: Path) -> None:
    """Refuse ``path`` while a live process on this host holds its lock (naming it); else return."""
    holder = _read_json(path / LOCK)
    pid, host = holder.get("pid"), holder.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and _alive(pid) and pid != os.getpid():
        raise LensesError(f"another run (process {pid} on {host}) is writing to {path}; wait for it to finish or "
                          "choose another --out.")


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def claim(out: str | os.PathLike, kind: str, resume: bool = False, overwrite: bool = False,
          owned: tuple[str, ...] = (), resumable: bool = True) -> OutputFolder:
    """Take ``out`` for a run of ``kind`` (see the module docstring). ``owned``: file-name patterns a
    run of this kind writes from other processes (e.g. per-rank checkpoints), also ours.
    ``resumable``: whether the kind has runs to finish (training) or is re-run view by view (analysis)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise LensesError(f"--out {path} is a file, not a folder; choose a folder path.")
    content = _content(path)
    mark = _read_json(path / MARK)
    if content and mark and "files" not in mark:  # a folder of an earlier lenses version: it was all ours
        mark["files"] = content
        mark.setdefault("state", "finished" if "translators.safetensors" in content else
                        "interrupted" if any(f.endswith("checkpoint.pt") for f in content) else None)
    if content and not mark:
        raise LensesError(f"--out {path} is not empty and was not made by lenses (it holds {_listing(content)}); "
                          "nothing was changed. Choose a new or empty folder for --out.")
    if content and mark.get("kind") != kind:
        raise LensesError(f"--out {path} holds a {mark.get('kind', 'unknown')} run's output, not a {kind} run's; "
                          "nothing was changed. Choose another --out.")
    folder = OutputFolder(path, kind, mark, owned)
    foreign = [f for f in content if not folder.ours(f)]
    if foreign:
        raise LensesError(f"--out {path} holds files lenses did not write ({_listing(foreign)}); nothing was "
                          "changed, and --overwrite would not touch them either. Move them away or choose another "
                          "--out.")
    state = mark.get("state")
    if state == "running":  # running now (its lock is held by a live process), or killed while running
        _refuse_if_running(path)
    if resumable and content:
        if state == "finished" and resume:
            raise LensesError(f"--out {path} holds a finished result (of a {kind} run): there is nothing to resume. "
                              "Pass --overwrite to replace it, or choose another --out.")
        if state == "finished" and not overwrite:
            raise LensesError(f"--out {path} already holds a finished result (of a {kind} run); pass --overwrite "
                              "to replace it, or choose another --out.")
        if state in ("running", "interrupted") and not (resume or overwrite):
            raise LensesError(f"--out {path} holds an interrupted {kind} run: pass --resume to continue it, "
                              "--overwrite to start afresh, or choose another --out.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        took_over = folder._lock()
    except OSError as e:
        raise LensesError(f"cannot write to {path}: {e.strerror}. Choose a writable output folder (--out).") from e
    try:
        if took_over and state == "running":
            state = "interrupted"
        folder._clean_temporaries()
        folder._save_mark()
        if resumable and overwrite and not resume:
            folder.forget([f for f in content if folder.ours(f)])
        folder.set_state("running")
    except BaseException as e:
        folder.release()
        if isinstance(e, OSError):
            raise LensesError(f"cannot write to {path}: {e.strerror}. Choose a writable output folder (--out).") from e
        raise
    return folder


def written_by_lenses(file: str | os.PathLike) -> bool:
    """Whether ``file`` was written by lenses: listed in its folder's manifest, or carrying our signature."""
    return _writer(Path(file))[0]


def _writer(file: Path) -> tuple[bool, str | None]:
    """(written by lenses, the run that wrote it where the file says: `lenses.base.io.signature`)."""
    import re

    try:
        with open(file, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        head = b""
    m = re.search(rb"lenses-toolkit run=([0-9a-f]{12})", head)
    listed = file.name in read_mark(file.parent).get("files", [])
    return listed or SIGNATURE.encode() in head, m[1].decode() if m else None


def check_target(file: str | os.PathLike, overwrite: bool = False, option: str = "the target") -> Path:
    """Refuse to replace an existing ``file`` unless ``overwrite`` or it is ours: lenses wrote it, and (where
    the file names the run that wrote it, and a run is writing now: `lenses.base.io.owner`) that run is this one."""
    file = Path(file)
    if file.is_dir():
        raise LensesError(f"{option} {file} is a folder; give a file name.")
    if not file.exists() or overwrite:
        return file
    ours, run = _writer(file)
    if not ours:
        raise LensesError(f"{option} {file} exists and was not written by lenses; nothing was changed. Pass "
                          "--overwrite (overwrite=True in Python) to replace it, or choose another file name.")
    now = io.current_owner()
    if run and now and run != now:
        raise LensesError(f"{option} {file} was written by another lenses run (of another --out); nothing was "
                          "changed. Pass --overwrite (overwrite=True in Python) to replace it, or choose another "
                          "file name.")
    return file


def mark_new(folder: str | os.PathLike, kind: str) -> Path:
    """Mark ``folder`` as a lenses folder of ``kind`` if it is new or empty (its files are then recorded as
    ours, so that saving there again replaces them); a folder with files keeps what it has."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LensesError(f"{folder} is a file; give a folder.")
    if not _content(folder) and not read_mark(folder):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            io.update_mark(folder, lambda m: m.update(kind=kind, files=[], state="finished"))
        except OSError as e:
            raise LensesError(f"cannot write to {folder}: {e.strerror}. Choose a writable folder.") from e
    return folder
