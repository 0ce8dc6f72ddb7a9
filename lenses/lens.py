"""The `Lens` protocol and the two lenses built on it.

A lens is a map ``transform(h, layer) -> h'`` of a layer's residual-stream state, followed by the
vocabulary engine's decode (`lenses.vocab.decode`: final norm, unembedding, soft-cap). That is all
a new lens class writes: `forward`, tracing, held-out evaluation, training (if it has parameters)
and saving/loading (`lenses.lens_io`) come from the base class. Layer ``L`` (the last) is always
decoded without a transform: it is the model's output.

    class MyLens(Lens):
        kind = "my-lens"                   # the name written into saved files
        def transform(self, h, layer):
            return h @ self.some_buffer.T
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torch import nn

from . import vocab
from .errors import LensesError, LensMismatchError
from .models import ModelAdapter


def as_adapter(model) -> ModelAdapter | None:
    if model is None or isinstance(model, ModelAdapter):
        return model
    return ModelAdapter.from_model(model)


class Lens(nn.Module):
    """Base class: ``transform`` per layer (0..L-1) plus the shared decode.

    Subclasses are registered by their ``kind`` so that `lenses.lens_io.load_lens` can rebuild them
    from a folder; their tensors (parameters and buffers) are what gets saved.
    """

    kind: ClassVar[str] = ""
    kinds: ClassVar[dict[str, type["Lens"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Lens.kinds[cls.kind] = cls

    def __init__(self, num_layers: int, d_model: int, config: dict[str, Any] | None = None):
        super().__init__()
        self.num_layers, self.d_model = num_layers, d_model
        self.config: dict[str, Any] = dict(config or {})
        self.adapter: ModelAdapter | None = None

    # ---- the protocol
    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The lens's map of ``hidden[layer]`` (0 <= layer < L) to a state the final norm can read."""
        raise NotImplementedError

    def has_layer(self, layer: int) -> bool:
        """Whether this lens reads ``hidden[layer]`` (a lens fitted on some layers only reports the others as
        absent: NaN in tables, a gap in plots)."""
        return True

    def transform_stack(self, h: torch.Tensor) -> torch.Tensor:
        """``transform`` of a stack ``[L, ..., d]`` of layers 0..L-1 (subclasses may batch it)."""
        return torch.stack([self.transform(h[layer], layer) for layer in range(h.shape[0])])

    def forward(self, h: torch.Tensor, layer: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """float32 logits of ``hidden[layer]`` states ``h`` [..., d] (vocabulary matmul in ``dtype``)."""
        if self.adapter is None:
            raise LensesError(
                "this lens has no model attached: call lens.attach(model) or load it with "
                "load_lens(path, model=model)."
            )
        if not 0 <= layer <= self.num_layers:
            raise LensesError(f"layer {layer} is out of range: this lens reads layers 0..{self.num_layers}.")
        return vocab.decode(self.adapter, h if layer == self.num_layers else self.transform(h, layer), dtype)

    # ---- the model it reads
    @classmethod
    def for_model(cls, model, **config) -> "Lens":
        """A fresh lens of this class for ``model`` (a HF model or `ModelAdapter`)."""
        adapter = as_adapter(model)
        lens = cls(adapter.num_layers, adapter.d_model, config=config)
        lens.attach(adapter, strict=False)
        return lens.to(adapter.device)

    def attach(self, model, strict: bool = True) -> "Lens":
        """Decode through ``model``'s unembedding, after checking the lens was made for it."""
        adapter = as_adapter(model)
        if (adapter.num_layers, adapter.d_model) != (self.num_layers, self.d_model):
            raise LensMismatchError(
                f"this lens has {self.num_layers} layers of width {self.d_model}, but the model has "
                f"{adapter.num_layers} layers of width {adapter.d_model}: it was trained for another model."
            )
        if "fingerprint" in self.config:
            adapter.check_fingerprint(self.config["fingerprint"], strict=strict)
        else:
            self.config["fingerprint"] = adapter.fingerprint()
            self.config.setdefault("model", getattr(adapter.model.config, "_name_or_path", ""))
        self.adapter = adapter
        return self.to(adapter.device)  # a lens lives where the model decodes (a fit accumulates on the CPU)

    # ---- files (see lenses.lens_io)
    def save_pretrained(self, path: str | os.PathLike, overwrite: bool = False):
        """Write the lens folder (see `lenses.lens_io.save_lens`; a folder lenses did not write is refused
        unless ``overwrite``)."""
        from .lens_io import save_lens

        return save_lens(self, path, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, path, model=None, strict: bool = True, device=None) -> "Lens":
        """Load a lens folder (or a shipped lens's name) of this class; see `lenses.lens_io.load_lens`."""
        from .lens_io import load_lens

        lens = load_lens(path, model=model, strict=strict, device=device)
        if not isinstance(lens, cls):
            raise LensesError(f"{path} holds a {lens.kind} lens, not a {cls.kind} lens; load it with "
                              "lenses.load_lens(path, model).")
        return lens


class LogitLens(Lens):
    """Decode any layer's hidden state with the model's final norm and unembedding (no transform)."""

    kind = "logit"

    def __init__(self, model, d_model: int | None = None, config: dict[str, Any] | None = None):
        if isinstance(model, int):  # the generic (num_layers, d_model) constructor
            super().__init__(model, d_model, config)
            return
        adapter = as_adapter(model)
        super().__init__(adapter.num_layers, adapter.d_model, config)
        self.attach(adapter, strict=False)

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return h

    def transform_stack(self, h: torch.Tensor) -> torch.Tensor:
        return h


class TunedLens(Lens):
    """Logit lens preceded by a learned translator ``h -> h + A_l h + b_l`` per layer (Belrose et
    al. 2023). The translators are stored stacked (``weight[l] = A_l``, ``bias[l] = b_l``) so all
    layers translate in one batched matmul; zero-initialised, so an untrained tuned lens equals the
    logit lens. The model is held by reference (never copied, never saved)."""

    kind = "tuned"

    def __init__(self, num_layers: int, d_model: int, model=None, config: dict[str, Any] | None = None):
        super().__init__(num_layers, d_model, config)
        self.weight = nn.Parameter(torch.zeros(num_layers, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(num_layers, d_model))
        if model is not None:
            self.attach(model)

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        w, b = self.weight[layer], self.bias[layer]
        return h + (h.to(w.dtype) @ w.T + b).to(h.dtype)

    def transform_stack(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(h.shape[0], -1, h.shape[-1]).to(self.weight.dtype)
        out = flat + torch.baddbmm(self.bias[:, None, :], flat, self.weight.transpose(1, 2))
        return out.reshape(h.shape).to(h.dtype)
