"""The settings of a tuned-lens training run (``lenses train`` / ``train_probes.py``): each a field and a CLI
option, declared once here; ``recipe`` fields decide the result and must match on ``--resume``."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from lenses.base.errors import LensesError
from lenses.base.options import ParallelOptions, ResumeOptions, option
from lenses.model.loading import ModelOptions
from lenses.text.corpora import CorpusOptions
from lenses.text.frequency import FrequencyVariant


def _positive_or_none(v):
    return None if v is None or v >= 1 else "must be at least 1 (omit it to use the default)"


@dataclass
class TrainConfig(ModelOptions, ParallelOptions, ResumeOptions, CorpusOptions):
    """Everything that defines a training run. ``recipe`` and ``model`` fields (except device and
    device map) decide the result and must match on ``--resume``; ``runtime`` fields are free."""

    OUT = "runs/lens"

    seq_len: int = option(256, "tokens per training sequence", group="recipe", min=2)
    batch_size: int = option(8, "sequences per step", group="recipe", min=1)
    max_tokens: int | None = option(200_000, "training tokens (steps = max_tokens // (batch_size * seq_len))",
                                    group="recipe", min=1)
    steps: int | None = option(None, "optimizer steps (overrides --max-tokens)", group="recipe", min=1)
    optimizer: str = option("sgd", "sgd (the tuned-lens recipe) or adam", group="recipe", choices=("sgd", "adam"))
    lr: float | None = option(None, "learning rate (none: sgd 1.0, scaled by 1 - momentum; adam 1e-3)",
                              group="recipe", above=0)
    momentum: float = option(0.9, "SGD momentum (Nesterov)", group="recipe", min=0,
                             check=lambda v: "must be below 1" if v >= 1 else None)
    weight_decay: float = option(1e-3, "weight decay", group="recipe", min=0)
    clip: float = option(1.0, "gradient-norm clip", group="recipe", above=0)
    seed: int = option(0, "seed of the data order and the frequency variants", group="recipe", min=0)
    eval_fraction: float = option(0.1, "share of the corpus's blocks held out for evaluation", group="recipe",
                                  above=0, below=1)
    max_eval_tokens: int = option(4096, "at most this many held-out tokens are evaluated", group="recipe", min=1)
    compute_dtype: str = option("auto", "dtype of the vocabulary matmuls (auto: measured on this machine)",
                                group="recipe", choices=("auto", "float32", "bfloat16", "float16"))
    frequencies: str | None = option(None, "token counts file (none: counted on the training blocks)",
                                     group="recipe")
    variant: FrequencyVariant = field(default_factory=FrequencyVariant,
                                      metadata={"group": "recipe", "fixed": True, "prefix": "freq_"})
    variant_name: str | None = option(None, "label of a reweighted variant in the lens config (none: baseline or "
                                            "reweighted)", group="runtime")
    checkpoint_every: int = option(10, "steps between checkpoints", group="runtime", min=1)
    chunk_rows: int | None = option(None, "rows of the [rows x vocab] logits buffer (none: by dtype and "
                                          "vocabulary size)", group="runtime", check=_positive_or_none)
    plan_check: bool = option(True, "refuse before loading when the memory plan (lenses plan) says the run does "
                                    "not fit the device", group="runtime")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def total_steps(self) -> int:
        if self.steps is not None:
            return max(1, self.steps)
        if self.max_tokens is None:
            raise LensesError("give --steps or --max-tokens")
        return max(1, self.max_tokens // self.tokens_per_step)

    def effective_lr(self) -> float:
        if self.optimizer == "sgd":
            return (1.0 if self.lr is None else self.lr) * (1 - self.momentum)
        return 1e-3 if self.lr is None else self.lr

    def label(self) -> str:
        return self.variant_name or ("baseline" if self.variant.neutral else "reweighted")

    def recipe(self) -> dict[str, Any]:
        """The settings that decide the result (compared on ``--resume``)."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata.get("fixed")}


def plain(value):
    return asdict(value) if dataclasses.is_dataclass(value) else value
