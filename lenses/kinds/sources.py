"""Where a lens named by the user lives: a folder or file path, the short name of a lens shipped in
the package (``smollm2-135m-instruct``), or a hub id (``neuronpedia/jacobian-lens:gpt2-small``,
through `lenses.kinds.hub`)."""

from __future__ import annotations

import os
from pathlib import Path

from lenses.base.errors import LensesError
from lenses.kinds import hub

PRETRAINED_DIR = Path(__file__).parent.parent / "pretrained"


def available() -> list[str]:
    """Names of the lenses shipped with this install."""
    if not PRETRAINED_DIR.exists():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").exists())


def resolve_lens_path(name: str | os.PathLike) -> Path:
    """A lens folder or file path, the folder of a shipped lens with that short name, or the local copy
    of a hub lens id (``neuronpedia/jacobian-lens:gpt2-small``; see `lenses.kinds.hub`)."""
    path = Path(name)
    if path.exists():
        return path
    if str(name) in available():
        return PRETRAINED_DIR / str(name)
    if hub.is_hub_id(str(name)):
        return hub.resolve(str(name))
    raise LensesError(
        f"no lens at {name!r}: not a folder or file, not a shipped lens name (shipped: {available() or 'none'}), "
        f"and not a hub id ({hub.JLENS_REPO}:<model>, {hub.TUNED_LENS_REPO}:<model>). Train one with "
        "`lenses train --out DIR` and pass DIR."
    )
