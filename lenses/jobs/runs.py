"""The skeleton every long job stands on: the tuned-lens training (`lenses.jobs.train`) and the
Jacobian-lens fit (`lenses.jobs.jlens_fit`) are each setup / step / finish over it.

- `open_job`: the process group (one process, or data parallel under ``torchrun``), the output folder
  claimed and locked (main process), Ctrl-C and SIGTERM turned into a request to stop at the next step
  boundary, and the model loaded (or a given one adapted); the folder is released however the job ends;
- `read_checkpoint`: a checkpoint is resumed only by the run that wrote it (same recipe, data, model
  fingerprint), else the differences are listed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lenses.base import lifecycle
from lenses.base.errors import CorruptFileError, LensesError
from lenses.base.io import owner, run_id
from lenses.base.outdir import OutputFolder, claim
from lenses.jobs.distributed import DataParallel
from lenses.model import fingerprint
from lenses.model.adapter import ModelAdapter
from lenses.text.chat import is_generated, read_corpus


@dataclass
class Job:
    """What a long job starts from (`open_job`)."""

    dp: DataParallel
    folder: OutputFolder | None  # claimed by the main process only
    model: Any
    tokenizer: Any
    adapter: ModelAdapter
    stop_requested: Callable[[], bool]  # true once Ctrl-C or SIGTERM asked the job to stop at a step boundary


@contextmanager
def open_job(cfg, kind: str, model=None, tokenizer=None, owned: tuple[str, ...] = (),
             check: Callable[[DataParallel], None] | None = None, seed: int | None = None) -> Iterator[Job]:
    """Start a job of ``kind`` from its config ``cfg`` (``out``, ``resume``, ``overwrite``, ``device`` and
    the `lenses.model.loading.ModelOptions`): ``check(dp)`` runs before anything is claimed; ``seed`` seeds
    torch before the model loads; ``owned``: file-name patterns other processes write into ``out``."""
    dp = DataParallel.from_env(cfg.device)
    if check is not None:
        check(dp)
    with stop_on_signal() as stop_requested, owner(run_id(kind, cfg.out)):  # a signal: stop at a step boundary
        folder = claim(cfg.out, kind, resume=cfg.resume, overwrite=cfg.overwrite, owned=owned) if dp.main else None
        try:
            if seed is not None:
                torch.manual_seed(seed)
            if model is None:
                model, tokenizer, adapter = cfg.load(device=dp.device)
            else:
                adapter = cfg.adapter(model)
            yield Job(dp, folder, model, tokenizer, adapter, stop_requested)
        finally:
            if folder:
                folder.release()


@contextmanager
def stop_on_signal() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C or SIGTERM into a request to stop at the next step boundary (checkpointed);
    a second one interrupts at once (the last periodic checkpoint still holds). `lenses.base.lifecycle`."""
    with lifecycle.Signals(raise_at_once=False):
        yield lifecycle.stop_requested


def job_corpus(job: Job, corpus: str | None, seed: int = 0, progress: bool = False) -> list[str]:
    """`lenses.text.chat.read_corpus` in a job of one or several processes: transcripts the model writes
    (``generated:N``) are written by the first process, and the others then read its cache."""
    if not is_generated(corpus):
        return read_corpus(corpus, job.adapter, job.tokenizer)
    if job.dp.world > 1 and not job.dp.main:
        job.dp.barrier()
    texts = read_corpus(corpus, job.adapter, job.tokenizer, seed, progress)
    if job.dp.world > 1 and job.dp.main:
        job.dp.barrier()
    return texts


def read_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's contents, after checking that it is whole and that the run that wrote it had the same
    ``identity`` (the settings that change the result); both failures say how to go on."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state.get("identity") or {"recipe": state["config"]}  # checkpoints before identities
    except Exception as e:
        raise CorruptFileError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); delete it, "
                               "or pass --overwrite to start afresh.") from e
    check_identity(saved, identity, path)
    return state


def check_identity(saved: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """Refuse to resume from a checkpoint whose run had other result-changing settings, naming them."""
    changed = _differences(saved, identity)
    if changed:
        raise LensesError(f"cannot resume {path.parent}: these settings differ from the checkpoint's, and they "
                          f"change the result: {'; '.join(changed)}. Use the checkpoint's settings, or another "
                          "--out (or --overwrite) to start afresh.")


def _differences(saved: dict, now: dict, where: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        if key not in saved or key not in now:  # recorded by one version only: nothing to compare
            continue
        a, b = saved.get(key), now.get(key)
        if key == "weights" and isinstance(a, dict) and isinstance(b, dict):  # a model fingerprint: with tolerance
            if fingerprint.compare(a, b)[0] != "same":
                out.append(f"{where}{key} (the model's weights) differ")
        elif isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{where}{key}.")
        elif a != b:
            short = len(repr(a)) + len(repr(b)) < 160
            out.append(f"{where}{key} was {a!r}, now {b!r}" if short else f"{where}{key} differs")
    return out
