"""The Jacobian lens (Gurnee et al. 2026, "Verbalizable Representations Form a Global Workspace in
Language Models"): ``hidden[k] -> hidden[k] @ J_k.T``, then the model's own final norm and unembedding.

``J_k`` is the corpus-averaged Jacobian of the last block's output (our ``hidden[L]``, before the
final norm) with respect to ``hidden[k]``: targets summed, sources averaged, prompts weighted
equally (`lenses.jobs.jlens_fit` computes it; ``../shared/JLENS.md`` has the definition). Layer ``L``
is the model's own output (identity). A layer without a matrix (layer 0 in every published file,
or layers left out of a file) is *absent*: `has_layer` says so and tables show NaN there; it is
never decoded as the logit lens in disguise.

Files: our lens folder (``config.json`` with the model fingerprint + ``translators.safetensors``,
matrices in float16, like every lens), and the two formats of the reference code and
TransformerLens, read with ``weights_only=True``:

- lens file: ``{"J": {i: [d, d]}, "n_prompts", "source_layers", "d_model", "metadata"?}``, where the
  reference's layer ``i`` is the output of block ``i``, our ``hidden[i + 1]`` (`REFERENCE_OFFSET`);
- fit checkpoint: ``{"jacobian_sum": {i: [d, d]}, "n_done", "next_idx", "source_layers",
  "target_layer", "skip_first"}``, whose mean is ``sum / n_done``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lenses.base import outdir
from lenses.base.errors import CorruptFileError, LensesError, LensMismatchError, first_line
from lenses.base.io import atomic_write
from lenses.kinds.files import check_finite, note_unchecked
from lenses.kinds.lens import Lens, as_adapter
from lenses.kinds.sources import resolve_lens_path

REFERENCE_OFFSET = 1  # the reference's layer i (output of block i) is our hidden[i + 1]


class JacobianLens(Lens):
    """One ``d x d`` transport matrix per layer: ``matrices[k]`` for ``hidden[k]``, where ``present[k]``."""

    kind = "jacobian"
    save_dtypes = {"matrices": torch.float16}  # as published; read back to float32

    def __init__(self, num_layers: int, d_model: int, config: dict[str, Any] | None = None):
        super().__init__(num_layers, d_model, config)
        self.register_buffer("matrices", torch.zeros(num_layers, d_model, d_model))
        self.register_buffer("present", torch.zeros(num_layers, dtype=torch.bool))

    # ---- the lens
    def has_layer(self, layer: int) -> bool:
        return layer == self.num_layers or bool(self.present[layer])

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        if not self.present[layer]:
            return torch.full_like(h, float("nan"))
        J = self.matrices[layer]
        return (h.to(J.dtype) @ J.T).to(h.dtype)

    def affine(self, layer: int):
        if not self.present[layer]:
            raise LensesError(f"the Jacobian lens has no matrix for hidden state {layer} (it was not fitted there), "
                              "so it has no directions at that layer; choose a layer it has.")
        return self.matrices[layer], None

    def transform_stack(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(h.shape[0], -1, h.shape[-1]).to(self.matrices.dtype)
        out = torch.bmm(flat, self.matrices[: h.shape[0]].transpose(1, 2))
        out[~self.present[: h.shape[0]]] = float("nan")
        return out.reshape(h.shape).to(h.dtype)

    # ---- building one
    @classmethod
    def from_matrices(cls, matrices: dict[int, torch.Tensor], num_layers: int, config: dict[str, Any] | None = None,
                      model=None) -> "JacobianLens":
        """A lens from ``{our layer k: J_k}`` (0 <= k < num_layers; the rest absent)."""
        if not matrices:
            raise LensesError("a Jacobian lens needs at least one layer's matrix; none was given.")
        first = next(iter(matrices.values()))
        d = first.shape[-1]
        lens = cls(num_layers, d, config)
        if first.dtype == torch.float64:  # a float64 fit stays float64 (float32 otherwise)
            lens.to(torch.float64)
        for k, J in matrices.items():
            if not 0 <= k < num_layers:
                raise LensMismatchError(f"the Jacobian lens has a matrix for hidden state {k}, outside "
                                        f"0..{num_layers - 1} of a {num_layers}-layer model: it was fitted for a "
                                        "model with more layers.")
            if tuple(J.shape) != (d, d):
                raise CorruptFileError(f"the matrix of layer {k} is {tuple(J.shape)}, not ({d}, {d}).")
            lens.matrices[k] = J
            lens.present[k] = True
        if model is not None:
            lens.attach(model)
        return lens

    @classmethod
    def from_pretrained(cls, path, model=None, strict: bool = True, device=None) -> "JacobianLens":
        """A lens folder, or a published / TransformerLens lens file or a reference fit checkpoint."""
        path = resolve_lens_path(path)
        if not path.is_file():
            return super().from_pretrained(path, model, strict, device)
        lens = load_published(path, model, strict)
        check_finite(lens.state_dict(), path)
        if model is not None:
            note_unchecked(path, "a published Jacobian-lens file")
        return lens.to(device) if device is not None else lens

    @property
    def layers(self) -> list[int]:
        """Our layers (``hidden[k]``) that have a matrix."""
        return self.present.nonzero().flatten().tolist()

    @property
    def n_prompts(self) -> int:
        return int(self.config.get("n_prompts", 0))

    def subset(self, layers) -> "JacobianLens":
        """The same lens with only ``layers`` (our numbering) kept."""
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise LensesError(f"layers {missing} are not in this Jacobian lens (it has {self.layers}).")
        out = JacobianLens.from_matrices({k: self.matrices[k] for k in layers}, self.num_layers, dict(self.config))
        out.adapter = self.adapter
        return out

    @staticmethod
    def merge(a: "JacobianLens", b: "JacobianLens") -> "JacobianLens":
        """The lens of both fits together: the n_prompts-weighted mean, layer by layer (layers in only
        one lens are taken from it)."""
        if (a.num_layers, a.d_model) != (b.num_layers, b.d_model):
            raise LensMismatchError(f"cannot merge Jacobian lenses of {a.num_layers}x{a.d_model} and "
                                    f"{b.num_layers}x{b.d_model}: they were fitted for different models.")
        na, nb = a.n_prompts or 1, b.n_prompts or 1
        out = {}
        for k in sorted(set(a.layers) | set(b.layers)):
            if k in a.layers and k in b.layers:
                out[k] = ((na * a.matrices[k].double() + nb * b.matrices[k].double()) / (na + nb)).to(a.matrices.dtype)
            else:
                out[k] = (a if k in a.layers else b).matrices[k]
        lens = JacobianLens.from_matrices(out, a.num_layers, {**a.config, "n_prompts": na + nb})
        lens.adapter = a.adapter
        return lens

    # ---- the published format
    def save_published(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                       overwrite: bool = False) -> Path:
        """Write the reference / TransformerLens lens file (``torch.save``; keys are the reference's
        layer numbers, our layer - 1). An existing file is replaced only if lenses wrote it there (its folder's
        manifest lists it: a new folder is marked as ours) or with ``overwrite``."""
        if self.present[0]:
            raise LensesError("this Jacobian lens has a matrix for the embeddings (hidden[0]), which the published "
                              "format cannot hold; save a subset without it: lens.subset(lens.layers[1:]).")
        J = {k - REFERENCE_OFFSET: self.matrices[k].detach().cpu().to(dtype).clone() for k in self.layers}
        meta = {key: v for key, v in self.config.items() if isinstance(v, (str, int, float, bool)) or v is None}
        payload = {"J": J, "n_prompts": self.n_prompts, "source_layers": sorted(J), "d_model": self.d_model,
                   "metadata": meta}
        outdir.mark_new(Path(path).parent, "export")
        return atomic_write(outdir.check_target(path, overwrite, "the file"), lambda tmp: torch.save(payload, tmp))


# --------------------------------------------------------------------------- reading the reference formats


def read_published(file: str | os.PathLike, num_layers: int | None = None) -> JacobianLens:
    """A published lens file or a reference fit checkpoint as a `JacobianLens` (not yet attached).

    ``num_layers`` (the model's L) is needed to place the matrices; without it the file's largest
    layer + 2 is assumed (published files hold reference layers 0..L-2).
    """
    file = Path(file)
    if file.is_file() and file.stat().st_size == 0:
        raise CorruptFileError(f"{file} is empty (0 bytes): a copy or download that did not finish. Re-download or "
                               "re-fit it.")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal (not plain data) or a damaged file
        raise CorruptFileError(f"{file} is not a Jacobian lens file that can be read safely ({type(e).__name__}: "
                               f"{first_line(e, 200)}); loading never runs code from a file. Re-download "
                               "or re-fit it.") from e
    if not isinstance(payload, dict) or not ({"J", "jacobian_sum"} & set(payload)):
        keys = sorted(map(str, payload))[:6] if isinstance(payload, dict) else type(payload).__name__
        raise CorruptFileError(f"{file} is not a Jacobian lens: a lens file has a 'J' entry and a fit checkpoint a "
                               f"'jacobian_sum' entry; this holds {keys}.")
    try:
        return _from_payload(file, payload, num_layers)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RuntimeError) as e:
        raise CorruptFileError(f"{file}: a field of this Jacobian lens file has the wrong type or shape "
                               f"({type(e).__name__}: {first_line(e, 160)}); the file is "
                               "damaged or not a lens. Re-download or re-fit it.") from e


def _from_payload(file: Path, payload: dict, num_layers: int | None) -> JacobianLens:
    """`read_published`'s reading of a loaded file's entries (each field's type checked where it is read)."""
    if "J" in payload:
        matrices, n = payload["J"], int(payload.get("n_prompts") or 0)
    else:
        n = int(payload.get("n_done") or 0)
        if n <= 0:
            raise CorruptFileError(f"{file} is a fit checkpoint with n_done = {n}: no prompt was fitted yet, so it "
                                   "holds no lens. Resume the fit (lenses fit --resume).")
        matrices = {k: (v.double() / n).float() for k, v in payload["jacobian_sum"].items()}
    if not isinstance(matrices, dict) or not matrices or not all(torch.is_tensor(v) for v in matrices.values()):
        raise CorruptFileError(f"{file}: its matrices are not a non-empty {{layer: tensor}} dict.")
    d = payload.get("d_model") or next(iter(matrices.values())).shape[-1]
    if isinstance(d, bool) or not isinstance(d, int):
        raise CorruptFileError(f"{file}: its d_model is {d!r}, not a whole number; the file is damaged.")
    try:
        if any(isinstance(i, bool) or int(i) != i for i in matrices):
            raise ValueError
        ours = {int(i) + REFERENCE_OFFSET: v for i, v in matrices.items()}
    except (TypeError, ValueError):
        raise CorruptFileError(f"{file}: its layer keys {sorted(map(str, matrices))[:4]} are not layer numbers; "
                               "it is not a Jacobian lens file.") from None
    L = num_layers or max(ours) + 1
    meta = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    config = {"n_prompts": n, "imported_from": file.name, **{k: v for k, v in meta.items() if k != "n_prompts"}}
    for key in ("target_layer", "skip_first"):
        if key in payload:
            config[key] = payload[key]
    bad = [i for i in matrices if tuple(matrices[i].shape) != (d, d)]
    if bad:
        raise CorruptFileError(f"{file}: the matrices of layers {bad[:4]} are not {d} x {d}.")
    return JacobianLens.from_matrices(ours, L, config)


def load_published(file: str | os.PathLike, model=None, strict: bool = True) -> JacobianLens:
    """`read_published`, then attached to ``model`` (which must match the file's width and layer count)."""
    if model is None:
        return read_published(file)
    adapter = as_adapter(model)
    probe = read_published(file)
    if probe.d_model != adapter.d_model:
        raise LensMismatchError(f"{file} was fitted for a model of width {probe.d_model}, but this model's width is "
                                f"{adapter.d_model}: load the lens for this model.")
    top = max(probe.layers)
    if top >= adapter.num_layers:
        raise LensMismatchError(f"{file} has a matrix for block {top - REFERENCE_OFFSET}'s output, but this model has "
                                f"only {adapter.num_layers} blocks (0..{adapter.num_layers - 1}), and the last block's "
                                "output is the model's own: it was fitted for a deeper model.")
    target = probe.config.get("target_layer")
    if isinstance(target, int) and target != adapter.num_layers - 1:
        raise LensMismatchError(f"{file} was fitted towards block {target}'s output, but this model's last block is "
                                f"{adapter.num_layers - 1}: it was fitted for another model (or another target).")
    lens = read_published(file, adapter.num_layers)
    lens.attach(adapter, strict=strict)
    return lens.to(adapter.device)
