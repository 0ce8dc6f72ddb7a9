"""The two probes: `LogitLens` (the model's own final norm + unembedding) and `TunedLens`
(one zero-initialised affine translator per layer in front of it).

Both take a hidden state of layer ``l`` (see `lenses.models` for the convention) and return
logits. Layer ``L`` (the last) is always decoded without a translator: it is the model's output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import CorruptFileError, LensesError, LensMismatchError
from .io import atomic_write, write_json
from .models import ModelAdapter

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "translators.safetensors"


def _as_adapter(model) -> ModelAdapter | None:
    if model is None or isinstance(model, ModelAdapter):
        return model
    return ModelAdapter.from_model(model)


class LogitLens(nn.Module):
    """Decode any layer's hidden state with the model's final norm and unembedding."""

    kind = "logit"

    def __init__(self, model):
        super().__init__()
        self.adapter = _as_adapter(model)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def transform_hidden(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return h

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.adapter.decode(h)


class TunedLens(nn.Module):
    """Logit lens preceded by a learned translator ``h -> h + A_l h + b_l`` per layer.

    The translators of all layers are stored stacked (``weight[l] = A_l``, ``bias[l] = b_l``),
    so training can translate many layers in one batched matmul. Zero-initialised: an untrained
    tuned lens equals the logit lens. The model is held by reference (never copied, never
    saved); a lens loaded without a model can be attached later with `attach`.
    """

    kind = "tuned"

    def __init__(self, num_layers: int, d_model: int, model=None, config: dict[str, Any] | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_layers, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(num_layers, d_model))
        self.config: dict[str, Any] = dict(config or {})
        self.adapter: ModelAdapter | None = None
        if model is not None:
            self.attach(model)

    @classmethod
    def for_model(cls, model, **config) -> "TunedLens":
        """A fresh (zero, i.e. logit-lens-equivalent) tuned lens for ``model``."""
        adapter = _as_adapter(model)
        lens = cls(adapter.num_layers, adapter.d_model, config=config)
        lens.attach(adapter, strict=False)
        lens.to(adapter.device)
        return lens

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def d_model(self) -> int:
        return self.weight.shape[1]

    def attach(self, model, strict: bool = True) -> "TunedLens":
        """Decode through ``model``'s unembedding, after checking the lens was made for it."""
        adapter = _as_adapter(model)
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
        return self

    # ---- math
    def transform_hidden(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """``h + A_l h + b_l``; identity for the last layer ``L``."""
        if layer == self.num_layers:
            return h
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers}")
        w, b = self.weight[layer], self.bias[layer]
        return h + (h.to(w.dtype) @ w.T + b).to(h.dtype)

    def translate_all(self, h: torch.Tensor) -> torch.Tensor:
        """Translate a stack ``[L, ..., d]`` of hidden states of layers 0..L-1 in one batched matmul."""
        flat = h.reshape(h.shape[0], -1, h.shape[-1]).to(self.weight.dtype)
        out = flat + torch.baddbmm(self.bias[:, None, :], flat, self.weight.transpose(1, 2))
        return out.reshape(h.shape).to(h.dtype)

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        if self.adapter is None:
            raise LensesError(
                "this lens has no model attached: call lens.attach(model) or load it with "
                "TunedLens.from_pretrained(path, model=model)."
            )
        return self.adapter.decode(self.transform_hidden(h, layer))

    # ---- persistence
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``translators.safetensors`` then ``config.json`` (each atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()}
        atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
        config = {
            **self.config,
            "lens": "tuned",
            "num_layers": self.num_layers,
            "d_model": self.d_model,
            "lenses_version": __version__,
        }
        write_json(path / CONFIG_NAME, config)
        return path

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        model=None,
        strict: bool = True,
        device: str | torch.device | None = None,
    ) -> "TunedLens":
        """Load a lens folder (ours, or the `tuned-lens` package's ``config.json`` + ``params.pt``).

        With ``model`` (a HF model or `ModelAdapter`) the lens is attached and checked against it;
        a lens for another model is refused (``strict=False`` relaxes the weight check only).
        """
        from .registry import resolve_lens_path

        path = resolve_lens_path(path)
        config = _read_config(path)
        if (path / WEIGHTS_NAME).exists():
            weight, bias = _read_ours(path / WEIGHTS_NAME)
        elif (path / "params.pt").exists():
            weight, bias = _read_tuned_lens_package(path / "params.pt", config)
            config = {"model": config.get("base_model_name_or_path", ""), "imported_from": "tuned-lens"}
        else:
            raise CorruptFileError(
                f"{path} has no {WEIGHTS_NAME} (nor a tuned-lens params.pt): is this a lens folder "
                "written by train_probes.py? Re-train or re-copy it."
            )
        declared = (config.get("num_layers", weight.shape[0]), config.get("d_model", weight.shape[1]))
        if declared != (weight.shape[0], weight.shape[1]) or weight.shape[1:] != (weight.shape[1], weight.shape[1]):
            raise CorruptFileError(
                f"{path}: config.json says {declared[0]} layers x {declared[1]} but the weights are "
                f"{tuple(weight.shape)}; the folder is inconsistent. Re-train or re-copy it."
            )
        lens = cls(weight.shape[0], weight.shape[1], config=config)
        with torch.no_grad():
            lens.weight.copy_(weight)
            lens.bias.copy_(bias)
        if model is not None:
            lens.attach(model, strict=strict)
            device = device or lens.adapter.device
        if device is not None:
            lens.to(device)
        return lens

    def export_tuned_lens(self, path: str | os.PathLike) -> Path:
        """Write this lens in the `tuned-lens` package's format (``config.json`` + ``params.pt``)."""
        path = Path(path)
        params = {}
        for i in range(self.num_layers):
            params[f"{i}.weight"] = self.weight[i].detach().cpu().clone()  # the package saves its
            params[f"{i}.bias"] = self.bias[i].detach().cpu().clone()  # ModuleList's state dict
        atomic_write(path / "params.pt", lambda tmp: torch.save(params, tmp))
        write_json(
            path / CONFIG_NAME,
            {
                "base_model_name_or_path": self.config.get("model", ""),
                "d_model": self.d_model,
                "num_hidden_layers": self.num_layers,
                "bias": True,
                "base_model_revision": None,
                "lens_type": "linear_tuned_lens",
            },
        )
        return path


# --------------------------------------------------------------------------- file readers


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_NAME
    if not file.exists():
        raise LensesError(f"{path} is not a lens folder (no {CONFIG_NAME}). Pass the --out folder of train_probes.py.")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{file} is not valid JSON ({e}); the lens folder is damaged: re-train or re-copy it.") from e


def _read_ours(file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
        return tensors["weight"].float(), tensors["bias"].float()
    except Exception as e:  # safetensors raises several types for truncation/corruption
        raise CorruptFileError(
            f"{file} is truncated or corrupt ({type(e).__name__}: {e}). Re-train, resume from the last "
            "checkpoint (train_probes.py --resume), or re-copy the file."
        ) from e


def _read_tuned_lens_package(file: Path, config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the tuned-lens package's translator keys (``{i}.weight``, the state dict of its
    ``layer_translators`` ModuleList; or ``layer_translators.{i}.weight``) to stacked tensors."""
    try:
        params = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptFileError(f"{file} could not be read ({type(e).__name__}: {e}); re-copy the lens.") from e
    params = {k.removeprefix("layer_translators."): v for k, v in params.items()}
    indices = [int(k.split(".")[0]) for k in params if k.split(".")[0].isdigit()]
    if not indices:
        raise CorruptFileError(f"{file} holds no translators (keys {sorted(params)[:4]}); it is not a tuned-lens lens.")
    n = int(config.get("num_hidden_layers", 0)) or 1 + max(indices)
    try:
        weight = torch.stack([params[f"{i}.weight"].float() for i in range(n)])
        bias = torch.stack([params.get(f"{i}.bias", torch.zeros(weight.shape[1])).float() for i in range(n)])
    except KeyError as e:
        raise CorruptFileError(f"{file} lacks translator {e}; it is not a complete tuned-lens lens.") from e
    return weight, bias
