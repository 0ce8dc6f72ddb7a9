"""Short names for lenses shipped inside the package (``TunedLens.from_pretrained("smollm2-135m-instruct")``)."""

from __future__ import annotations

from pathlib import Path

from lenses.base.errors import LensesError, LensMismatchError
from lenses.kinds import catalog
from lenses.kinds.lens import LogitLens
from lenses.kinds.load import load_lens
from lenses.kinds.sources import PRETRAINED_DIR, available, resolve_lens_path  # noqa: F401  (where lenses are found)
from lenses.text import convention


def shipped_for(adapter) -> dict[str, str]:
    """kind -> name of the shipped lens made for ``adapter``'s model (same fingerprint). Where several of a
    kind ship, the one trained on text wins over one trained on the model's own chat transcripts
    (``generated:`` corpus: pass that one by name)."""
    import json

    candidates = []
    for name in available():
        try:
            saved = json.loads((PRETRAINED_DIR / name / "config.json").read_text(encoding="utf-8"))
            if not saved.get("fingerprint"):
                continue
            adapter.check_fingerprint(saved["fingerprint"], strict=True)
        except (LensMismatchError, ValueError, OSError, KeyError):
            continue
        corpus = str((saved.get("training") or {}).get("corpus") or "")
        candidates.append((corpus.startswith("generated:"), name, saved.get("lens", "tuned")))
    found: dict[str, str] = {}
    for _, name, kind in sorted(candidates):
        found.setdefault(kind, name)
    return found


def find_for(adapter, kind: str = "tuned") -> str | None:
    """The name of the shipped lens of ``kind`` made for ``adapter``'s model, if any."""
    return shipped_for(adapter).get(kind)


def select_lenses(spec: str | list[str], adapter, strict: bool = True, tokenizer=None) -> dict:
    """name -> lens for a lens choice: ``auto`` (the logit lens plus the lenses shipped for this model,
    if any), ``logit``, ``both`` (logit + shipped tuned lens; an error if none is shipped), ``tuned`` or
    ``jacobian`` (the shipped lens of that kind), or lens folders / files / shipped names / hub ids, each
    optionally prefixed by a label (``jacobian:runs/jlens``, ``mine:runs/lens``). A list or a
    comma-separated string combines them; the logit lens always comes first. With ``tokenizer``, a lens made
    under another input convention (e.g. trained without the BOS this tokenizer adds) is refused
    (`lenses.text.convention.check_lens`; ``strict=False`` reads it as a close variant)."""
    lenses = _select(spec, adapter, strict)
    if tokenizer is not None:
        for name, lens in lenses.items():
            note = convention.check_lens(lens.config, tokenizer, f"the {name} lens", strict)
            if note:
                print(note)
    return lenses


def _select(spec, adapter, strict: bool) -> dict:
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not parts:
        raise LensesError("--lens is empty: use auto, logit, both, tuned, jacobian, or a lens folder or file.")
    lenses = {"logit": LogitLens(adapter)}
    shipped = shipped_for(adapter)
    for part in parts:
        label, source = _labelled(part)
        if source == "logit":
            continue
        if source in ("auto", "both", "tuned", "jacobian"):
            kinds = {"auto": list(shipped), "both": ["tuned"], "tuned": ["tuned"], "jacobian": ["jacobian"]}[source]
            missing = [k for k in kinds if k not in shipped]
            if missing and source != "auto":
                job = "fit" if missing[0] == "jacobian" else "train"
                raise LensesError(f"no {missing[0]} lens is shipped for this model: make one with `lenses {job} "
                                  "--model ... --out DIR` and pass --lens DIR.")
            if not kinds:
                print("note: no shipped lens matches this model; showing the logit lens only "
                      f"(train one with train_probes.py and pass --lens DIR){_published_for(adapter)}.")
            for kind in kinds:
                lenses[kind if label is None or len(kinds) > 1 else label] = load_lens(shipped[kind], model=adapter,
                                                                                       strict=strict)
            continue
        lens = load_lens(source, model=adapter, strict=strict)
        name = label or (lens.kind if lens.kind not in lenses else f"{lens.kind}:{Path(source).name}")
        if name in lenses:
            raise LensesError(f"two lenses are named {name!r} in --lens; label them, e.g. a:{source}.")
        lenses[name] = lens
    return lenses


def _labelled(part: str) -> tuple[str | None, str]:
    """``label:source`` -> (label, source); a hub id (``owner/repo:name``) or a path is not a label."""
    head, sep, rest = part.partition(":")
    if sep and rest and "/" not in head and "\\" not in head and len(head) > 1 and not Path(part).exists():
        return head, rest
    return None, part


def _published_for(adapter) -> str:
    """``"; published: ID, ..."`` for the catalog's lenses of this model (by its hub id), or ``""``."""
    name = str(getattr(adapter.model.config, "_name_or_path", "") or "")
    found = [e.lens_id for e in catalog.entries() if e.repo != "lenses" and name and e.model.lower() == name.lower()]
    return f"; published for {name}: {', '.join(found)} (pass it as --lens)" if found else ""
