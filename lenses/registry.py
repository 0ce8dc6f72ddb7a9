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
    """A lens folder or file path, the folder of a shipped lens with that short name, or the local copy
    of a hub lens id (``neuronpedia/jacobian-lens:gpt2-small``; see `lenses.hub`)."""
    from . import hub

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
        "`python train_probes.py --out DIR` and pass DIR."
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


def select_lenses(spec: str | list[str], adapter, strict: bool = True) -> dict:
    """name -> lens for a lens choice: ``auto`` (the logit lens plus the lens shipped for this model,
    if any), ``logit``, ``both`` (logit + shipped lens; an error if none is shipped), or lens folders /
    shipped names (each added after the logit lens). A list or a comma-separated string combines them."""
    from .lens import LogitLens
    from .lens_io import load_lens

    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not parts:
        raise LensesError("--lens is empty: use auto, logit, both, or a lens folder.")
    lenses = {"logit": LogitLens(adapter)}
    for part in parts:
        if part == "logit":
            continue
        if part in ("auto", "both"):
            name = find_for(adapter)
            if name is None:
                if part == "both":
                    raise LensesError("no tuned lens is shipped for this model: train one with "
                                      "`python train_probes.py --model ... --out DIR` and pass --lens DIR.")
                print("note: no shipped lens matches this model; showing the logit lens only "
                      "(train one with train_probes.py and pass --lens DIR).")
                continue
            part = name
        lens = load_lens(part, model=adapter, strict=strict)
        label = lens.kind if lens.kind not in lenses else f"{lens.kind}:{Path(part).name}"
        lenses[label] = lens
    return lenses
