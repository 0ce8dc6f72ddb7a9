"""Loading a lens of any kind: `load_lens` picks the class from the file; `KINDS` names every kind
(explicitly: `register_kind` adds one of your own). The folder format itself is `lenses.kinds.files`;
`export_tuned_lens` writes the `tuned-lens` package's format."""

from __future__ import annotations

import os
from pathlib import Path

from lenses.base import door
from lenses.base.errors import CorruptFileError, LensesError
from lenses.kinds import files as lens_files
from lenses.kinds.jacobian import JacobianLens
from lenses.kinds.lens import Lens, LogitLens, TunedLens
from lenses.kinds.sources import resolve_lens_path
from lenses.model.adapter import ModelAdapter
from lenses.text import convention

KINDS: dict[str, type[Lens]] = {"logit": LogitLens, "tuned": TunedLens, "jacobian": JacobianLens}


def register_kind(cls: type[Lens]) -> type[Lens]:
    """Let `load_lens` rebuild lenses of ``cls`` (a `Lens` subclass with its own ``kind``) from their files."""
    if not (isinstance(cls, type) and issubclass(cls, Lens) and cls.kind):
        raise LensesError(f"{cls!r} is not a Lens subclass with a kind name; give it `kind = \"my-lens\"`.")
    KINDS[cls.kind] = cls
    return cls


def save_lens(lens: Lens, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """``lens.save_pretrained(path)``: write ``translators.safetensors`` then ``config.json``."""
    return lens.save_pretrained(path, overwrite=overwrite)


def load_lens(path: str | os.PathLike, model=None, strict: bool = True, device=None, tokenizer=None) -> Lens:
    """Load any lens: a folder (ours of any kind in `KINDS`, or tuned-lens's), a Jacobian-lens file
    (published format or fit checkpoint, `lenses.kinds.jacobian`), a shipped lens's name or a hub id.

    With ``model`` (a HF model or `ModelAdapter`) the lens is attached and checked against it; a lens
    made for another model is refused (``strict=False`` relaxes the weight check only). With ``tokenizer``,
    a lens made under another input convention (e.g. without the BOS this tokenizer adds) is refused too
    (`lenses.text.convention.check_lens`).
    """
    path, strict = door.path("path", path), door.boolean("strict", strict)
    device = door.device("device", device, optional=True)
    if model is not None and not isinstance(model, ModelAdapter):
        door.module("model", model)
    lens = _load(resolve_lens_path(path), model, strict, device)
    if tokenizer is not None:
        note = convention.check_lens(lens.config, tokenizer, f"the lens {path}", strict)
        if note:
            print(note)
    return lens


def _load(path: Path, model, strict: bool, device) -> Lens:
    if path.is_file():
        return JacobianLens.from_pretrained(path, model, strict, device)
    kind, config, tensors = lens_files.read_folder(path)
    if kind not in KINDS:
        raise CorruptFileError(f"{path} holds a lens of kind {kind!r}, which lenses does not know (known: "
                               f"{sorted(KINDS)}): register its class first (lenses.kinds.load.register_kind(MyLens)), "
                               "load it with MyLens.from_pretrained(path), or upgrade lenses.")
    lens = KINDS[kind].from_tensors(path, config, tensors)
    return lens.attach_loaded(path, model, strict, device)


def export_tuned_lens(lens: TunedLens, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``lens`` in the `tuned-lens` package's format (``config.json`` + ``params.pt``); files lenses did
    not write there (a model folder's config.json) are refused unless ``overwrite``."""
    return lens.save_tuned_lens_format(path, overwrite)


