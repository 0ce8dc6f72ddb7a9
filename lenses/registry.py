"""Short names for lenses shipped inside the package (``TunedLens.from_pretrained("smollm2-135m-instruct")``)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LensesError

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def available() -> list[str]:
    """Names of the lenses shipped with this install."""
    if not PRETRAINED_DIR.exists():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").exists())


def resolve_lens_path(name: str | os.PathLike) -> Path:
    """A lens folder path, or the folder of a shipped lens with that short name."""
    path = Path(name)
    if path.exists():
        return path
    if str(name) in available():
        return PRETRAINED_DIR / str(name)
    raise LensesError(
        f"no lens at {name!r}: not a folder, and not a shipped lens name (shipped: {available() or 'none'}). "
        "Train one with `python train_probes.py --out DIR` and pass DIR."
    )


def find_for(adapter) -> str | None:
    """The name of a shipped lens made for ``adapter``'s model (same fingerprint), if any."""
    import json

    from .errors import LensMismatchError

    for name in available():
        try:
            saved = json.loads((PRETRAINED_DIR / name / "config.json").read_text(encoding="utf-8"))
            if not saved.get("fingerprint"):
                continue
            adapter.check_fingerprint(saved["fingerprint"], strict=True)
        except (LensMismatchError, ValueError, OSError, KeyError):
            continue
        return name
    return None
