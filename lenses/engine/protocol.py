"""What the engine needs of a model: its final norm and unembedding, and what it does to logits.

`lenses.model.adapter.ModelAdapter` is one; so is `warmup._StandIn`. The engine sits below the model
layer and never imports it: this Protocol is the whole of the contract between them.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Readout(Protocol):
    unembed: torch.nn.Module  # ``weight`` [V, d] and ``bias`` (or None)
    logit_scale: float  # applied after the unembedding (Cohere, Granite); 1.0 for most models
    softcap: float | None  # Gemma 2/3's final soft-capping, or None
    device: torch.device
    vocab_size: int

    def final_norm(self, h: torch.Tensor) -> torch.Tensor: ...

    def unembed_weight(self, dtype: torch.dtype) -> torch.Tensor: ...

    def unembed_plain(self) -> torch.Tensor: ...
