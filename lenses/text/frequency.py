"""Token frequencies over a corpus (with the model's own tokenizer), ranks and rank buckets.

Used twice: by the frequency-reweighted training variants (positions whose token is very
frequent get lighter or fewer updates) and by the analysis (which frequency bucket does each
layer's top-1 guess fall in). Buckets follow Gupta et al. 2025 (arXiv 2510.18871): frequency
ranks 1-10, 11-100, 101-1000, 1001+.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from lenses.base.errors import CorruptFileError, DataError
from lenses.base.io import atomic_write
from lenses.base.options import Options, option

FREQUENCIES_NAME = "token_frequencies.safetensors"
BUCKET_EDGES = (10, 100, 1000)  # upper rank of each bucket but the last
BUCKET_NAMES = ("1-10", "11-100", "101-1000", "1001+")


@dataclass
class TokenFrequencies:
    """Counts of each token id; rank 1 is the most frequent (ties broken by lower id)."""

    counts: torch.Tensor  # [vocab] int64

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, vocab_size: int) -> "TokenFrequencies":
        tokens = tokens.reshape(-1)
        if tokens.numel() == 0:
            raise DataError("cannot count token frequencies of an empty corpus; pass text with --corpus.")
        return cls(torch.bincount(tokens, minlength=vocab_size)[:vocab_size].long())

    @property
    def ranks(self) -> torch.Tensor:
        """[vocab] rank of each token id (1 = most frequent)."""
        order = torch.argsort(-self.counts, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(order) + 1)
        return ranks

    def top_ids(self, k: int) -> torch.Tensor:
        return torch.argsort(-self.counts, stable=True)[:k]

    def bucket(self, ids: torch.Tensor) -> torch.Tensor:
        """Bucket index (0..3, see BUCKET_NAMES) of each token id."""
        return torch.bucketize(self.ranks[ids.cpu()], torch.tensor(BUCKET_EDGES), right=False)

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        file = path / FREQUENCIES_NAME if path.suffix != ".safetensors" else path
        atomic_write(file, lambda tmp: save_file({"counts": self.counts.contiguous()}, tmp))
        return file

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenFrequencies":
        from safetensors.torch import load_file

        path = Path(path)
        file = path / FREQUENCIES_NAME if path.is_dir() else path
        if not file.exists():
            raise DataError(f"no token frequency file at {file}; train_probes.py writes one next to each lens.")
        try:
            return cls(load_file(str(file))["counts"].long())
        except Exception as e:
            raise CorruptFileError(f"{file} is truncated or corrupt ({type(e).__name__}); re-create it.") from e


@dataclass
class FrequencyVariant(Options):
    """How training treats positions by the frequency of "their" token (all neutral = baseline).

    - ``alpha``: loss weight ``count^-alpha``;
    - ``topk`` + ``topk_weight``: a fixed loss factor for the ``topk`` most frequent tokens;
    - ``topk`` + ``keep_prob``: positions with a top-k token are kept with probability ``keep_prob``
      (``topk=1, keep_prob=1e-3`` is the paper's control: 1000x fewer updates for "the");
    - ``type_cap``: at most this many positions per token type in each batch;
    - ``token``: which token a position "has": ``teacher`` (the final layer's top-1, default, since
      the loss is KL to the final distribution), ``next`` (the true next token) or ``input``.

    Weights are normalised to mean 1 over the batch (dropped positions count as 0).
    """

    option_prefix = "freq_"

    alpha: float = option(0.0, "loss weight count^-alpha", group="recipe", min=0)
    topk: int = option(1, "the k most frequent tokens for --freq-topk-weight and --freq-keep-prob", group="recipe",
                       min=1)
    topk_weight: float = option(1.0, "loss factor for positions of a top-k token", group="recipe", min=0)
    keep_prob: float = option(1.0, "keep positions of a top-k token with this probability", group="recipe",
                              above=0, check=lambda v: "must be at most 1" if v > 1 else None)
    type_cap: int | None = option(None, "at most this many positions per token type per batch", group="recipe",
                                  min=1)
    token: str = option("teacher", "a position's token: the final top-1 (teacher), the next token or the input",
                        group="recipe", choices=("teacher", "next", "input"))

    @property
    def neutral(self) -> bool:
        return self.alpha == 0 and self.topk_weight == 1 and self.keep_prob == 1 and self.type_cap is None

    def weights(self, tokens: torch.Tensor, freqs: TokenFrequencies, generator: torch.Generator) -> torch.Tensor:
        """Per-position loss weights [N] (mean 1) for positions whose token ids are ``tokens`` [N]."""
        tokens = tokens.cpu()
        w = torch.ones(tokens.shape[0], dtype=torch.float64)
        if self.alpha:
            w *= freqs.counts[tokens].clamp(min=1).double().pow(-self.alpha)
        in_top = torch.isin(tokens, freqs.top_ids(self.topk))
        if self.topk_weight != 1:
            w[in_top] *= self.topk_weight
        if self.keep_prob < 1:
            drop = in_top & (torch.rand(tokens.shape[0], generator=generator, dtype=torch.float64) >= self.keep_prob)
            w[drop] = 0
        if self.type_cap is not None:
            order = torch.randperm(tokens.shape[0], generator=generator)
            seen: dict[int, int] = {}
            for i in order.tolist():
                t = int(tokens[i])
                seen[t] = seen.get(t, 0) + 1
                if seen[t] > self.type_cap:
                    w[i] = 0
        if w.sum() == 0:
            return w.float()  # nothing to learn from in this batch
        return (w / w.mean()).float()


def bucket_shares(top1: torch.Tensor, freqs: TokenFrequencies) -> pd.DataFrame:
    """Share of top-1 predictions in each frequency bucket, per layer: tidy (layer, bucket, share).

    ``top1``: [layers, N] token ids. Shares of a layer sum to 1.
    """
    b = freqs.bucket(top1)  # [layers, N]
    counts = torch.stack([(b == k).sum(1) for k in range(len(BUCKET_NAMES))], dim=1).double()
    shares = counts / counts.sum(1, keepdim=True)
    return pd.DataFrame(
        [
            {"layer": layer, "bucket": name, "share": float(shares[layer, k])}
            for layer in range(shares.shape[0])
            for k, name in enumerate(BUCKET_NAMES)
        ]
    )
