"""The analysis views behind one interface.

Each view module exposes ``run(ctx) -> ViewResult`` and ``plot(result, path)``; `VIEWS` maps view
names to those modules, so ``analyze.py`` is a loop over it and a new view is one module plus
one line here. A `Context` carries the model, the lenses and the settings (`AnalysisConfig`), and
reads shared inputs (the text corpus) once for all views.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..chat import MAX_GENERATE, generated_corpus, is_generated, parse_generated
from ..cli import option
from .. import corpora
from ..corpora import NAMES
from ..data import read_texts, split_documents, tokenize
from ..errors import LensesError
from ..loading import ModelOptions
from ..models import ModelAdapter
from ..plan import trace_batch_size
from .common import ViewResult, require


def _suffix(path: str, allowed: tuple[str, ...]) -> str | None:
    """A check of an output file's name: its suffix says what is written (and no input is overwritten by mistake)."""
    from pathlib import Path

    if Path(path).suffix.lower() not in allowed:
        return f"should end in {' or '.join(allowed)} (got {path!r})"
    if Path(path).is_dir():
        return f"is a folder ({path!r}); give a file name"
    return None


@dataclass
class AnalysisConfig(ModelOptions):
    """Settings of ``analyze.py`` (and of `run_views`); each is also a CLI option."""

    lens: str = option("auto", "auto | logit | both | tuned | jacobian | a lens folder, J-lens .pt file, shipped "
                       "name or hub id, optionally labelled (jlens:runs/jlens); comma-separate several", group="lens")
    strict: bool = option(True, "refuse a lens whose model weights differ slightly from this model's", group="lens")
    out: str = option("out", "output folder")
    overwrite: bool = option(False, "replace views in --out made with other settings (another model, lens, "
                             "corpus, ...), and --html/--png files lenses did not write")
    seed: int = option(0, "seed of every sample the views draw", min=0)
    batch_size: int | None = option(None, "texts per forward pass in the views (none: from the memory plan, at "
                                          "most 16; 1: one at a time)", min=1)
    decode_dtype: str = option("auto", "dtype of the views' vocabulary matmuls: bfloat16/float16 re-score each row's "
                               "top tokens and targets in float32, so top-1 ids stay exact (auto: bfloat16 where "
                               "this device multiplies it natively, else float32)",
                               choices=("auto", "float32", "bfloat16", "float16"))
    progress: bool = option(True, "progress bars")
    prompt: str = option("The capital of France is", "text to decode layer by layer (without --view)",
                         group="prompt", check=lambda v: "is empty; give some text" if not v.strip() else None)
    all_positions: bool = option(False, "print every position of --prompt, not just the last", group="prompt")
    top_k: int = option(5, "top tokens kept per layer and position (table, page)", group="prompt", min=1)
    html: str | None = option(None, "also write the interactive layer-by-position page here (e.g. out/lens.html)",
                              group="prompt", check=lambda v: _suffix(v, (".html", ".htm")))
    png: str | None = option(None, "also draw the grid as a figure here (e.g. out/lens.png; .pdf, .svg too)",
                             group="prompt", check=lambda v: _suffix(v, (".png", ".pdf", ".svg")))
    color: str = option("top1_prob", "colour statistic of --png", group="prompt",
                        choices=("top1_prob", "entropy", "kl", "rank_next"))
    chat_template: str = option("auto", "facts, mcq and the grid: wrap each prompt in the tokenizer's chat template "
                                "(user turn; answers scored from the assistant's first token). auto: on for an "
                                "instruct/chat model whose tokenizer has a template", group="prompt",
                                choices=("auto", "on", "off"))
    system: str | None = option(None, "a system prompt for the chat template", group="prompt")
    generate: int | None = option(None, "grid: generate this many tokens after --prompt and trace them too (at "
                                  f"most {MAX_GENERATE} and the model's positions)", group="prompt", min=1,
                                  below=MAX_GENERATE + 1)
    sample: bool = option(False, "grid: sample the generated tokens (with --seed) instead of greedy", group="prompt")
    sublayers: bool = option(False, "grid: also the half layers l + 0.5 (after each block's attention, before its "
                             "MLP), read with layer l's reading", group="prompt")
    corpus: str | None = option(None, "text for frequency, pos and representation: wikipedia, books, pydocs, "
                                      "a .txt/.jsonl file or folder, or generated:N[:SOURCE] (N chat transcripts "
                                      "the model writes; none: wikipedia)", group="views")
    facts: str | None = option(None, "facts JSONL: {prompt, answer}, CounterFact or MQuAKE (none: shipped set)",
                               group="views")
    mcq: str | None = option(None, "MMLU-layout CSV: question,A,B,C,D,answer (none: shipped set)", group="views")
    frequencies: str | None = option(None, "token_frequencies.safetensors (none: counted on --corpus)",
                                     group="views")
    num_positions: int = option(1000, "frequency, early-exit and agreement: positions traced", group="views", min=1)
    freq_prompts: str = option("paragraphs", "frequency: one held-out paragraph per prompt cut at a random word "
                               "(the paper), or positions of held-out blocks", group="views",
                               choices=("paragraphs", "blocks"))
    num_texts: int = option(200, "pos: paragraphs tagged", group="views", min=1)
    num_facts: int | None = option(None, "facts: sample this many (none: all)", group="views", min=1)
    num_questions: int = option(100, "mcq: questions scored", group="views", min=1)
    num_prompts: int = option(200, "representation: prompts", group="views", min=2)
    prompt_tokens: int = option(64, "representation: tokens per prompt", group="views", min=2)
    alpha: float = option(1.0, "representation: Renyi order (1 = von Neumann)", group="views", above=0)
    drop_first_token: bool = option(False, "representation: leave out position 0 (attention-sink token)",
                                    group="views")
    hist_layer: int | None = option(None, "representation: layer of the entropy histogram (none: the middle)",
                                    group="views", min=0)
    tasks: str = option("sentiment,yesno,continent,mcq", "patching: label-set tasks, shipped names or JSONL files "
                        "{prompt, labels, answer}, comma-separated", group="causal")
    num_pairs: int = option(10, "patching: prompt pairs per ordered pair of tasks", group="causal", min=1)
    positions: str = option("last", "patching: patch the last position, or all (prompts of equal length)",
                            group="causal", choices=("last", "all"))
    first_token: bool = option(False, "patching: let a multi-token label stand for its first token", group="causal")
    skip_positions: int = option(128, "layer-skip: positions scored", group="causal", min=1)
    skip_mode: str = option("zero", "layer-skip: the skipped block's update becomes zero, or its mean",
                            group="causal", choices=("zero", "mean"))


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
        from ..vocab import compute_dtype

        return {"dtype": compute_dtype(self.cfg.decode_dtype, self.adapter.device)}

    @cached_property
    def chat(self) -> tuple[bool, str]:
        """``(wrap prompts in the chat template?, why)`` from ``--chat-template``, the tokenizer and the model's
        name (`lenses.chat.use_template`)."""
        from ..chat import use_template
        from ..loading import DEFAULT_MODEL

        config = getattr(self.adapter.model, "config", None)
        name = f"{self.cfg.model or DEFAULT_MODEL} {getattr(config, '_name_or_path', '')}"
        return use_template(self.cfg.chat_template, self.tokenizer, name, self.cfg.system)

    @property
    def chat_args(self) -> dict:
        """The keyword arguments of the views that read prompts as chat turns (facts, mcq)."""
        return {"chat": self.chat[0], "system": self.cfg.system}

    @cached_property
    def batch_size(self) -> int:
        """Texts per forward pass: ``--batch-size``, else the memory rule of `lenses.plan.trace_batch_size`."""
        if self.cfg.batch_size is not None:
            return self.cfg.batch_size
        return trace_batch_size(self.adapter)

    @cached_property
    def texts(self) -> list[str]:
        """Every document of ``--corpus`` (``generated:N[:SOURCE]``: N chat transcripts the model writes, as
        `train_probes.py` makes them, `lenses.chat.generated_corpus`)."""
        if is_generated(self.cfg.corpus):
            return self.generated(parse_generated(self.cfg.corpus)[0])
        return read_texts(self.cfg.corpus)

    def generated(self, n: int) -> list[str]:
        """The first ``n`` transcripts of ``--corpus generated:...:SOURCE`` (the same ones at every ``n``)."""
        source = parse_generated(self.cfg.corpus)[1]
        return generated_corpus(self.adapter, self.tokenizer, f"generated:{n}" + (f":{source}" if source else ""),
                                seed=self.cfg.seed, progress=self.cfg.progress)

    @property
    def corpus_name(self) -> str:
        return self.cfg.corpus or corpora.DEFAULT

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
        return training["corpus"] or corpora.DEFAULT
    corpus = config.get("corpus")
    return corpus if isinstance(corpus, str) else None


def _corpus_key(name: str | None) -> str | None:
    """Named corpora by name, files by their resolved path."""
    from pathlib import Path


    if name is None or name in NAMES:
        return name
    if is_generated(name):  # transcripts i are the same at every N: one corpus per SOURCE
        return "generated:" + (parse_generated(name)[1] or corpora.DEFAULT)
    return str(Path(name).resolve())


# The settings each view's result depends on (besides the model and the lenses): a view in --out made with
# other values is replaced only with --overwrite, so a page never mixes runs.
VIEW_SETTINGS = {
    "grid": ("prompt", "top_k", "chat_template", "system", "generate", "sample", "sublayers"),
    "frequency": ("corpus", "num_positions", "freq_prompts", "frequencies"),
    "pos": ("corpus", "num_texts"),
    "facts": ("facts", "num_facts", "chat_template", "system"),
    "mcq": ("mcq", "num_questions", "chat_template", "system"),
    "representation": ("corpus", "num_prompts", "prompt_tokens", "alpha", "drop_first_token", "hist_layer"),
    "early-exit": ("corpus", "num_positions"),
    "patching": ("tasks", "num_pairs", "positions", "first_token"),
    "layer-skip": ("corpus", "skip_positions", "skip_mode"),
    "agreement": ("corpus", "num_positions"),
    "calibration": ("corpus", "num_positions"),
    "sublayer": ("corpus", "num_positions", "frequencies"),
}
MODEL_SETTINGS = ("model", "model_dtype", "quantize", "decode_dtype", "layers", "final_norm", "unembed", "lens",
                  "strict", "seed")  # settings every view's result depends on: a page holds one of each


def view_settings(cfg: AnalysisConfig, name: str) -> dict:
    """The settings view ``name``'s result depends on, as recorded in ``report.json``."""
    return {k: getattr(cfg, k) for k in MODEL_SETTINGS + VIEW_SETTINGS[name]}


def _views() -> dict:
    from . import (agreement, calibration, early_exit, facts, frequency, layer_skip, mcq, patching, pos,
                   representation, sublayer)

    return {"frequency": frequency, "pos": pos, "facts": facts, "mcq": mcq, "representation": representation,
            "early-exit": early_exit, "patching": patching, "layer-skip": layer_skip, "agreement": agreement,
            "calibration": calibration, "sublayer": sublayer}


VIEW_NAMES = ("frequency", "pos", "facts", "mcq", "representation", "early-exit", "patching", "layer-skip",
              "agreement", "calibration", "sublayer")
DEPTH_VIEWS = VIEW_NAMES[:4]  # "all": the four depth-analysis views of Gupta et al. 2025
CAUSAL_VIEWS = VIEW_NAMES[5:8]  # "causal": interventions that check what the lenses show


def get_view(name: str):
    """The module of view ``name`` (with ``run`` and ``plot``)."""
    views = _views()
    if name not in views:
        raise LensesError(f"unknown view {name!r}; choose one of {', '.join(views)} or all.")
    return views[name]


def run_view(name: str, ctx: Context) -> ViewResult:
    return get_view(name).run(ctx)


__all__ = ["AnalysisConfig", "Context", "ViewResult", "VIEW_NAMES", "view_settings", "DEPTH_VIEWS", "CAUSAL_VIEWS",
           "get_view", "run_view"]
