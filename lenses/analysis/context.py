"""What a view runs on: the model, the lenses, the settings, and the inputs the views share (the corpus,
read once and held out from what the lenses here were trained on)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lenses.analysis.common import require
from lenses.analysis.config import AnalysisConfig
from lenses.engine import compute_dtype
from lenses.jobs.plan import trace_batch_size
from lenses.model.adapter import ModelAdapter
from lenses.model.loading import DEFAULT_MODEL
from lenses.text import corpora
from lenses.text.chat import is_generated, parse_generated, read_corpus, use_template
from lenses.text.corpora import NAMES
from lenses.text.data import split_documents, tokenize


@dataclass
class Context:
    """What a view runs on: the model (adapter + tokenizer), the lenses and the settings."""

    adapter: ModelAdapter
    tokenizer: Any
    lenses: dict
    cfg: AnalysisConfig

    @property
    def parts(self) -> tuple:
        """``(adapter, tokenizer, lenses)``: the first arguments of every view function."""
        return self.adapter, self.tokenizer, self.lenses

    @property
    def sampling(self) -> dict:
        """The keyword arguments every view function takes from the settings."""
        return {"seed": self.cfg.seed, "progress": self.cfg.progress, "batch_size": self.batch_size}

    @property
    def decoding(self) -> dict:
        """The keyword arguments of the views that trace: the vocabulary matmuls' dtype (``--decode-dtype``)."""
        return {"dtype": compute_dtype(self.cfg.decode_dtype, self.adapter.device)}

    @cached_property
    def chat(self) -> tuple[bool, str]:
        """``(wrap prompts in the chat template?, why)`` from ``--chat-template``, the tokenizer and the model's
        name (`lenses.text.chat.use_template`)."""
        config = getattr(self.adapter.model, "config", None)
        name = f"{self.cfg.model or DEFAULT_MODEL} {getattr(config, '_name_or_path', '')}"
        return use_template(self.cfg.chat_template, self.tokenizer, name, self.cfg.system)

    @property
    def chat_args(self) -> dict:
        """The keyword arguments of the views that read prompts as chat turns (facts, mcq)."""
        return {"chat": self.chat[0], "system": self.cfg.system}

    @cached_property
    def batch_size(self) -> int:
        """Texts per forward pass: ``--batch-size``, else the memory rule of `lenses.jobs.plan.trace_batch_size`."""
        if self.cfg.batch_size is not None:
            return self.cfg.batch_size
        return trace_batch_size(self.adapter)

    @cached_property
    def texts(self) -> list[str]:
        """Every document of ``--corpus`` (``generated:N[:SOURCE]``: N chat transcripts the model writes, as
        `train_probes.py` makes them, `lenses.text.chat.generated_corpus`)."""
        return read_corpus(self.cfg.corpus, self.adapter, self.tokenizer, self.cfg.seed, self.cfg.progress)

    def generated(self, n: int) -> list[str]:
        """The first ``n`` transcripts of ``--corpus generated:...:SOURCE`` (the same ones at every ``n``)."""
        source = parse_generated(self.cfg.corpus)[1]
        return read_corpus(f"generated:{n}" + (f":{source}" if source else ""), self.adapter, self.tokenizer,
                           self.cfg.seed, self.cfg.progress)

    @property
    def corpus_name(self) -> str:
        return corpora.resolve_name(self.cfg.corpus)

    def trained_on(self) -> list[str]:
        """Names of the lenses here that were trained or fitted on ``--corpus``."""
        mine = _corpus_key(self.corpus_name)
        return [name for name, lens in self.lenses.items()
                if _corpus_key(_lens_corpus(lens)) == mine and _lens_corpus(lens) is not None]

    @cached_property
    def view_texts(self) -> tuple[list[str], str]:
        """``(documents, source)``: what the corpus views read. The held-out documents (the split
        ``train_probes.py`` uses) when a lens here was trained on ``--corpus``, so no view scores a lens
        on its own training text; otherwise all of it (your own text is read whole)."""
        texts, trained = self.texts, self.trained_on()
        if trained and is_generated(self.corpus_name):
            return self._generated_held_out(trained)
        if trained:
            docs, streams, cut = split_documents(texts, self.tokenizer)
            self.__dict__["corpus_tokens"] = torch.cat(streams)  # all of it, for counting token frequencies
            if cut < len(docs):
                held = docs[cut:]
                lenses = f"{' and '.join(trained)} {'lens was' if len(trained) == 1 else 'lenses were'}"
                return held, (f"the {len(held):,} held-out of {len(texts):,} documents of {self.corpus_name} "
                              f"(the {lenses} trained on the others)")
            lenses = f"{' and '.join(trained)} {'lens was' if len(trained) == 1 else 'lenses were'}"
            return texts, (f"all of {self.corpus_name} ({len(texts):,} document(s), too few to hold some out; the "
                           f"{lenses} trained on it)")
        return texts, f"all {len(texts):,} document(s) of {self.corpus_name} (no lens here was trained on it)"

    def _generated_held_out(self, trained: list[str]) -> tuple[list[str], str]:
        """The transcripts no lens here trained on: a lens trained on ``generated:N`` trained on the first part
        of `split_documents` of the first N transcripts; every other transcript (of any N) is held out."""
        seen: set[str] = set()
        for name in trained:
            n = parse_generated(_lens_corpus(self.lenses[name]))[0]
            docs, _, cut = split_documents(self.generated(n) if n > len(self.texts) else self.texts[:n],
                                           self.tokenizer)
            seen.update(docs[:cut])
        held = [t for t in self.texts if t not in seen]
        require(len(held) > 0, f"every transcript of --corpus {self.corpus_name} was training text of the "
                               f"{' and '.join(trained)} lens; ask for more (a larger N in generated:N).")
        lenses = f"{' and '.join(trained)} {'lens was' if len(trained) == 1 else 'lenses were'}"
        return held, (f"the {len(held):,} of {len(self.texts):,} transcripts of {self.corpus_name} that no lens here "
                      f"trained on (the {lenses} trained on the others)")

    @cached_property
    def corpus_tokens(self) -> torch.Tensor:
        """Every token of ``--corpus`` (for token frequencies counted on it)."""
        return tokenize(self.texts, self.tokenizer)


def _lens_corpus(lens) -> str | None:
    """The corpus a lens was trained or fitted on, as its config records it (None: not recorded)."""
    config = getattr(lens, "config", {}) or {}
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    if "corpus" in training:
        return corpora.resolve_name(training["corpus"])
    corpus = config.get("corpus")
    return corpus if isinstance(corpus, str) else None


def _corpus_key(name: str | None) -> str | None:
    """Named corpora by name, files by their resolved path."""
    if name is None or name in NAMES:
        return name
    if is_generated(name):  # transcripts i are the same at every N: one corpus per SOURCE
        return "generated:" + corpora.resolve_name(parse_generated(name)[1])
    return str(Path(name).resolve())


