"""Texts a reading job has finished, saved as it goes, so that ``--resume`` after a kill recomputes none of them,
on any number of processes.

Within `saving(Saver(folder, resume, every))` (``lenses analyze`` opens it around each view), every `trace`:

1. names its work by a key: a digest of everything that decides its rows (the model's fingerprint, each lens's
   name and weights, the texts' token ids, positions and targets, the decode dtype, top-k, the token groups);
2. every ``every`` seconds, and when it ends, writes the rows of the texts it finished since the last save to
   ``<folder>/.partial/<key>/part-r<rank>-<n>.npz`` (one file per process and save, written to a temporary name
   and renamed; plain arrays, no pickle);
3. with ``resume``, first reads every part of its key, whichever process (of whatever world size) wrote it, and
   traces only the other texts, shared over the processes as always (`lenses.tracing.parallel`); the first
   process puts the saved rows back, so the merged table is the uninterrupted one.

The job deletes a view's parts once its tables are written (`Saver.clear`). Outside `saving`, nothing is saved.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lenses.base.io import TMP_SUFFIX

PARTIAL = ".partial"
PART = "part-*.npz"  # the names the output folder counts as ours (`lenses.base.outdir.claim`'s ``owned``)


@dataclass
class Saver:
    """Where and how often the traces of a job save their finished texts."""

    folder: Path
    resume: bool = False
    every: float = 60.0
    used: set = field(default_factory=set)  # keys traced since the last `clear`

    def pending(self) -> int:
        """Parts left in the folder by an interrupted run."""
        return len(list((Path(self.folder) / PARTIAL).glob(f"*/{PART}")))

    def clear(self, everything: bool = False) -> None:
        """Delete the parts of the traces since the last clear (``everything``: every part in the folder)."""
        root = Path(self.folder) / PARTIAL
        for key in ([p.name for p in root.iterdir()] if everything and root.is_dir() else self.used):
            shutil.rmtree(root / key, ignore_errors=True)
        self.used.clear()
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()


_current: list[Saver | None] = [None]


@contextmanager
def saving(saver: Saver | None):
    """Within this block every `trace` saves and (with ``saver.resume``) reuses its finished texts."""
    old, _current[0] = _current[0], saver
    try:
        yield saver
    finally:
        _current[0] = old


def current() -> Saver | None:
    return _current[0]


def _digest(h, value) -> None:
    if isinstance(value, torch.Tensor):
        h.update(str((value.dtype, tuple(value.shape))).encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())


def _lens_weights(h, lens) -> None:
    """A lens's identity: its class and every tensor it holds (a lens folder changed on disk gets a new key)."""
    h.update(type(lens).__name__.encode())
    if isinstance(lens, torch.nn.Module):
        for name, t in lens.state_dict().items():
            h.update(name.encode())
            _digest(h, t)
    else:
        _digest(h, getattr(lens, "config", None))


class Parts:
    """One trace's saved parts (see the module docstring)."""

    def __init__(self, saver: Saver, key: str, rank: int):
        self.saver, self.rank, self.dir = saver, rank, Path(saver.folder) / PARTIAL / key
        self.last, self.count = time.monotonic(), 0
        saver.used.add(key)

    @classmethod
    def of(cls, adapter, lenses: dict, items: list, settings: tuple, rank: int) -> "Parts | None":
        """The parts of a trace of ``items`` with these ``lenses`` and ``settings``, or None outside `saving`."""
        saver = _current[0]
        if saver is None:
            return None
        h = hashlib.sha256()
        _digest(h, sorted(adapter.fingerprint().items(), key=lambda kv: kv[0]))
        for name, lens in lenses.items():
            h.update(name.encode())
            _lens_weights(h, lens)
        for it in items:
            _digest(h, (list(it.ids), list(it.positions), sorted((k, list(v)) for k, v in it.targets.items())))
        _digest(h, settings)
        return cls(saver, h.hexdigest()[:20], rank)

    def earlier(self) -> tuple[list[pd.DataFrame], set[int], int]:
        """With ``--resume``: the saved rows, the items they cover and the rows decoded whole among them."""
        if not self.saver.resume or not self.dir.is_dir():
            return [], set(), 0
        frames, redone = [], 0
        for file in sorted(self.dir.glob(PART)):
            with np.load(file, allow_pickle=False) as z:
                redone += int(z["__redone__"])
                frames.append(pd.DataFrame({k: z[k] for k in z.files if k != "__redone__"}))
        for f in frames:
            if "lens" in f:
                f["lens"] = f["lens"].astype(object)
        done = {int(i) for f in frames for i in f["item"].unique()}
        return frames, done, redone

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.saver.every

    def save(self, frame: pd.DataFrame, redone: int) -> None:
        """Write the rows of finished texts ``frame`` (every row of each of its items) as one part."""
        self.last = time.monotonic()
        if not len(frame):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        arrays = {k: frame[k].to_numpy() for k in frame.columns}
        arrays = {k: a.astype(str) if a.dtype == object else a for k, a in arrays.items()}  # no pickled objects
        name = f"part-r{self.rank}-{os.getpid()}-{self.count:05d}.npz"
        tmp = self.dir / f".{name}{TMP_SUFFIX}"
        with open(tmp, "wb") as f:
            np.savez(f, __redone__=np.asarray(redone), **arrays)
        os.replace(tmp, self.dir / name)
        self.count += 1


def resumed_note(done: int, traced: int, total: int, rank: int) -> None:
    """One line on the first process when a trace resumed: texts read back, texts traced now (by every process)."""
    if done and rank == 0:
        print(f"tracing: resumed {done} of {total} texts from the interrupted run; traced the other {traced} now",
              file=sys.stderr)
