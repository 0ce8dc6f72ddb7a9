"""The `Lens` protocol and the two lenses built on it.

A lens is a map ``transform(h, layer) -> h'`` of a layer's residual-stream state, followed by the
vocabulary engine's decode (`lenses.engine.decode`: final norm, unembedding, soft-cap). That is all
a new lens class writes: `forward`, tracing, held-out evaluation, training (if it has parameters)
and saving/loading (`save_pretrained`, `from_pretrained`) come from the base class. Layer ``L`` (the last) is always
decoded without a transform: it is the model's output.

    class MyLens(Lens):
        kind = "my-lens"                   # the name written into saved files
        def transform(self, h, layer):
            return h @ self.some_buffer.T
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lenses import engine
from lenses.base import door, outdir
from lenses.base.errors import CorruptFileError, LensesError, LensMismatchError, first_line
from lenses.base.io import atomic_write, write_json
from lenses.kinds import directions as lens_directions
from lenses.kinds import files as lens_files
from lenses.kinds import publish
from lenses.kinds.sources import resolve_lens_path
from lenses.model.adapter import ModelAdapter


def as_adapter(model) -> ModelAdapter:
    """``model`` (a loaded model or its `ModelAdapter`) as its adapter; anything else is refused."""
    if isinstance(model, ModelAdapter):
        return model
    return ModelAdapter.from_model(door.module("model", model))


class Lens(nn.Module):
    """Base class: ``transform`` per layer (0..L-1) plus the shared decode.

    A subclass's ``kind`` is the name written into its files; its tensors (parameters and buffers) are
    what gets saved. `lenses.kinds.load.register_kind` lets `lenses.load_lens` rebuild a kind of your own.
    """

    kind: ClassVar[str] = ""

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
        h = door.tensor("h", h, last=self.d_model)
        layer = door.integer("layer", layer, 0, self.num_layers)
        dtype = door.dtype("dtype", dtype, door.FLOAT_DTYPES, optional=True)
        return engine.decode(self.adapter, self.state(h.to(self.adapter.device), layer), dtype)

    def state(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """What the final norm and unembedding read for ``hidden[layer]`` states ``h``: ``transform(h, layer)``,
        or ``h`` itself at the last layer (the model's own output)."""
        return h if layer == self.num_layers else self.transform(h, layer)

    def affine(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(M, b)`` with ``transform(h, layer) = h @ M.T + b`` (None: the identity, zero), for lens directions
        (`directions`). A lens kind whose transform is not affine keeps this refusal."""
        raise LensesError(f"the {self.kind or type(self).__name__} lens has no directions: its transform is not "
                          "declared affine. Define affine(layer) -> (M, b) on the class to act along its directions.")

    def directions(self, layer: int, token_ids, dtype: torch.dtype = torch.float64):
        """The vectors in ``hidden[layer]``'s space that carry each token's lens logit (`lenses.kinds.directions`:
        ``logit_t = (v_t . h + u_t . b) / sigma(M h + b) + c_t``, linear up to the norm's one scalar 1/sigma)."""
        return lens_directions.directions(self, layer, token_ids, dtype)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters training optimises (`lenses.jobs.train`): every parameter that requires a gradient.
        A lens without any (logit, Jacobian) is built or fitted, not trained."""
        return [p for p in self.parameters() if p.requires_grad]

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
            note = adapter.check_fingerprint(self.config["fingerprint"], strict=strict)
            if note:
                print(note, file=sys.stderr)
        else:
            self.config["fingerprint"] = adapter.fingerprint()
            self.config.setdefault("model", getattr(adapter.model.config, "_name_or_path", ""))
        self.adapter = adapter
        return self.to(adapter.device)  # a lens lives where the model decodes (a fit accumulates on the CPU)

    # ---- files (the folder format: lenses.kinds.files)
    def push_to_hub(self, repo_id: str, subfolder: str = "", revision: str | None = None, format: str = "lenses",
                    overwrite: bool = False, hub=None) -> str:
        """Publish this lens with a model card (`lenses.kinds.publish.push_to_hub`: ``format`` lenses or tuned-lens)."""
        return publish.push_to_hub(self, repo_id, subfolder, revision, format, overwrite, hub)

    def save_pretrained(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the lens folder: its tensors (in `save_dtypes`) and its config. A folder lenses did not
        write is refused unless ``overwrite`` (see `lenses.kinds.files.write_folder`)."""
        cast = getattr(self, "save_dtypes", {})
        tensors = {k: v.detach().cpu().to(cast.get(k, v.dtype)).contiguous() for k, v in self.state_dict().items()}
        config = {**self.config, "lens": self.kind, "num_layers": self.num_layers, "d_model": self.d_model}
        return lens_files.write_folder(path, tensors, config, overwrite)

    @classmethod
    def from_pretrained(cls, path, model=None, strict: bool = True, device=None) -> "Lens":
        """Load a lens folder of this class (a path, a shipped lens's name or a hub id); with ``model``,
        attach it and check it was made for that model. `lenses.load_lens` loads a lens of any kind."""
        path = resolve_lens_path(path)
        if path.is_file():
            raise LensesError(f"{path} is a file; a {cls.kind or cls.__name__} lens is a folder (config.json + "
                              f"{lens_files.WEIGHTS_NAME}). Jacobian-lens files load with lenses.load_lens(path).")
        kind, config, tensors = lens_files.read_folder(path)
        if kind != cls.kind:
            raise LensesError(f"{path} holds a {kind} lens, not a {cls.kind} lens; load it with "
                              "lenses.load_lens(path, model).")
        lens = cls.from_tensors(path, config, tensors)
        return lens.attach_loaded(path, model, strict, device)

    @classmethod
    def from_tensors(cls, path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "Lens":
        """A lens of this class from a folder's config and tensors (shapes checked, values finite)."""
        first = next(iter(tensors.values()), None)
        shape = (first.shape[0], first.shape[-1]) if first is not None and first.dim() >= 2 else (0, 0)
        try:
            num_layers, d_model = int(config.get("num_layers", shape[0])), int(config.get("d_model", shape[1]))
            lens = cls(num_layers, d_model, config=config)
            own = lens.state_dict()
            for name, t in tensors.items():
                if name in own and own[name].shape != t.shape:
                    raise ValueError(f"tensor {name!r} is {tuple(t.shape)}, expected {tuple(own[name].shape)}")
            lens.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in tensors.items()})
        except (RuntimeError, ValueError, TypeError) as e:
            raise CorruptFileError(f"{path}: the lens files do not fit together ({first_line(e, 300)}); "
                                   "the folder is inconsistent. Re-train or re-copy it.") from e
        lens_files.check_finite(lens.state_dict(), path)
        return lens

    def attach_loaded(self, path: Path, model=None, strict: bool = True, device=None) -> "Lens":
        """Attach a lens just read from ``path`` to ``model`` (if given; a one-line note when the file
        carries no fingerprint to check) and move it to ``device``."""
        if model is not None:
            if not isinstance(self.config.get("fingerprint"), dict):
                what = "a tuned-lens package lens" if "imported_from" in self.config else "a lens file"
                lens_files.note_unchecked(path, what)
            self.attach(model, strict=strict)
            device = device or self.adapter.device
        return self.to(device) if device is not None else self


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

    def affine(self, layer: int):
        return None, None


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

    def affine(self, layer: int):
        w = self.weight[layer].detach()
        return torch.eye(self.d_model, dtype=w.dtype, device=w.device) + w, self.bias[layer].detach()

    def transform_stack(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(h.shape[0], -1, h.shape[-1]).to(self.weight.dtype)
        out = flat + torch.baddbmm(self.bias[:, None, :], flat, self.weight.transpose(1, 2))
        return out.reshape(h.shape).to(h.dtype)

    def save_tuned_lens_format(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write this lens in the `tuned-lens` package's format (``config.json`` + ``params.pt``), which
        tuned-lens 0.2's ``TunedLens.from_model_and_pretrained`` and ``from_unembed_and_pretrained`` read.
        Files lenses did not write there (a model folder's ``config.json``) are refused unless ``overwrite``;
        a new folder is marked as ours, so saving there again replaces them."""
        path = outdir.mark_new(path, "export")
        for name in ("params.pt", lens_files.CONFIG_NAME):
            outdir.check_target(path / name, overwrite, "the file")
        params = {}
        for i in range(self.num_layers):
            params[f"{i}.weight"] = self.weight[i].detach().cpu().clone()
            params[f"{i}.bias"] = self.bias[i].detach().cpu().clone()
        atomic_write(path / "params.pt", lambda tmp: torch.save(params, tmp))
        write_json(path / lens_files.CONFIG_NAME, {
            "base_model_name_or_path": self.config.get("model", ""), "d_model": self.d_model,
            "num_hidden_layers": self.num_layers, "bias": True, "base_model_revision": None,
            "lens_type": "linear_tuned_lens",
        })
        return path
