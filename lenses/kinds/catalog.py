"""Every published lens we could verify, kept as data in the package so that it answers offline.

Sources (checked against the hubs' file listings, December 2026):
- ``AlignmentResearch/tuned-lens`` (a Hugging Face *space*): the tuned lenses of Belrose et al. (2023), one
  folder ``lens/<model id>/`` (``config.json`` + ``params.pt``) per model; 32 folders verified.
- ``neuronpedia/jacobian-lens`` (a model repository): the Jacobian lenses of Gurnee et al. (2026), one file
  per model fitted on WikiText (`lenses.kinds.hub.JACOBIAN_LENSES`).
- the lenses shipped inside this package (`lenses.kinds.sources.available`), with their cards.
Load any entry with ``load_lens(entry.lens_id, model)`` (``--lens ID``); with a network the files download
once into the Hugging Face cache.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from lenses.base.errors import LensesError
from lenses.kinds.hub import JACOBIAN_LENSES, JLENS_REPO, TUNED_LENS_REPO
from lenses.kinds.sources import PRETRAINED_DIR, available
from lenses.text import corpora

KINDS = ("tuned", "jacobian")
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma-3-270m": "google/gemma-3-270m"}

# model ids with a folder lens/<id>/ in AlignmentResearch/tuned-lens (verified folders, main branch)
TUNED_LENS_MODELS = (
    "gpt2", "gpt2-large", "gpt2-xl",
    "EleutherAI/gpt-neox-20b",
    *(f"EleutherAI/pythia-{size}-deduped" for size in ("70m", "160m", "410m", "1.4b", "2.8b", "6.9b", "12b")),
    *(f"EleutherAI/pythia-{size}-deduped-v0" for size in ("70m", "160m", "410m", "1b", "1.4b", "6.9b", "12b")),
    "facebook/opt-125m", "facebook/opt-1.3b", "facebook/opt-6.7b",
    "facebook/llama-7b", "facebook/llama-13b", "facebook/llama-30b", "facebook/vicuna-13b",
    "lmsys/vicuna-13b-v1.1",
    "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-13b-hf",
    "meta-llama/Llama-2-13b-chat-hf", "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
)


@dataclass(frozen=True)
class Entry:
    """One published lens: for which model, of which kind, where (repository, revision, subfolder or file)."""

    model: str
    kind: str
    repo: str
    subfolder: str
    revision: str = "main"
    corpus: str | None = None
    source: str = ""

    @property
    def lens_id(self) -> str:
        """What ``--lens`` and `load_lens` take for this entry."""
        if self.repo == "lenses":
            return self.subfolder
        if self.repo == JLENS_REPO:
            return f"{JLENS_REPO}:{self.subfolder.split('/')[0]}"
        name = self.subfolder.removeprefix("lens/") if self.repo == TUNED_LENS_REPO else self.subfolder
        return f"{self.repo}:{name}"


def _shipped() -> list[Entry]:
    out = []
    for name in available():
        config = json.loads((PRETRAINED_DIR / name / "config.json").read_text(encoding="utf-8"))
        corpus = corpora.resolve_name((config.get("training") or {}).get("corpus") or config.get("corpus"))
        model = str(config.get("model") or name)
        out.append(Entry(HUB_IDS.get(model, model), config.get("lens", "tuned"),
                         "lenses", name, corpus=corpus, source="shipped in this package"))
    return out


def entries() -> list[Entry]:
    """Every catalogued lens: the tuned-lens space's, Neuronpedia's J-lenses and ours."""
    tuned = [Entry(m, "tuned", TUNED_LENS_REPO, f"lens/{m}", source="Belrose et al. 2023 (hub space)")
             for m in TUNED_LENS_MODELS]
    jacobian = [Entry(model_id, "jacobian", JLENS_REPO, f"{short}/jlens/Salesforce-wikitext/{base}_jacobian_lens.pt",
                      corpus="Salesforce/wikitext", source="Gurnee et al. 2026 (Neuronpedia)")
                for short, (model_id, base) in JACOBIAN_LENSES.items()]
    return tuned + jacobian + _shipped()


def find(model: str | None = None, kind: str | None = None) -> list[Entry]:
    """Entries whose model id contains ``model`` (case-insensitive; its short name matches too) and of ``kind``."""
    if kind is not None and kind not in KINDS:
        raise LensesError(f"unknown --kind {kind!r}: use {' or '.join(KINDS)}.")
    needle = (model or "").lower()
    return [e for e in entries() if (kind is None or e.kind == kind)
            and (not needle or needle in e.model.lower() or needle in e.lens_id.lower())]


def main(argv: list[str]) -> int:
    """``lenses catalog [--model ID] [--kind tuned|jacobian] [--json]``."""
    import argparse

    p = argparse.ArgumentParser(prog="lenses catalog", description="Published lenses, listed offline.")
    p.add_argument("--model", help="only lenses for models whose id contains this (e.g. gemma-3, pythia)")
    p.add_argument("--kind", choices=KINDS, help="only this kind of lens")
    p.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    a = p.parse_args(argv)
    found = find(a.model, a.kind)
    if a.json:
        print(json.dumps([{**asdict(e), "lens_id": e.lens_id} for e in found], indent=2))
        return 0
    if not found:
        print(f"no published lens matches (model {a.model!r}, kind {a.kind or 'any'}); train one: lenses train "
              "--model ... --out DIR")
        return 0
    width = max(len(e.model) for e in found)
    for e in found:
        print(f"{e.model:<{width}}  {e.kind:<8}  {e.lens_id}")
    print(f"{len(found)} lens(es); load one with --lens <last column> or lenses.load_lens(<it>, model)")
    return 0
