"""Lens directions: for token ``t`` at layer ``l``, the vector ``v_t`` in the residual space with

    lens_logit_t(h) = (v_t . h + u_t . b) / sigma(M h + b) + c_t        (before any soft-capping)

for a lens whose transform at ``l`` is affine, ``T(h) = M h + b`` (logit lens ``M = I``; tuned lens
``I + A_l``, ``b = b_l``; Jacobian lens ``J_l``), and a final norm ``g * (C x) / sigma(x) + beta``
(`lenses.model.norm_affine`: ``C`` removes the mean for LayerNorm, is ``I`` for RMSNorm). Here
``u_t = s C (g * W_U[t])`` is the token's readout vector at the final norm's input (``s`` the model's logit
scale), ``v_t = M^T u_t`` and ``c_t = s (beta . W_U[t] + bias_t)``. The identity is exact; the logit is
*linear* in ``h`` to first order because ``1/sigma`` is one positive scalar per state: it changes the size of
every token's logit together, never which direction carries which token. So ``v_t . h`` is the part of
``h`` the lens reads as token ``t``: project ``v_t`` out and that part of the token's logit is zero.

A lens kind gives its affine map through ``Lens.affine(layer)``; one that has none (a non-linear lens) is
refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lenses.base.errors import LensesError
from lenses.model.norm_affine import NormAffine, norm_affine


@dataclass
class Directions:
    """Directions of ``token_ids`` at one layer of one lens (float64 unless the model is not float)."""

    layer: int
    token_ids: torch.Tensor  # [k]
    vectors: torch.Tensor  # v [k, d]: read by the lens at hidden[layer]
    readout: torch.Tensor  # u [k, d]: the same tokens at the final norm's input
    offset: torch.Tensor  # [k]: u . b (the lens's own bias), before 1/sigma
    constant: torch.Tensor  # [k]: c (the norm's bias and the unembedding's, times the logit scale)
    matrix: torch.Tensor | None  # M [d, d] (None: the identity)
    bias: torch.Tensor | None  # b [d] (None: zero)
    norm: NormAffine

    def first_order(self, h: torch.Tensor) -> torch.Tensor:
        """``v_t . h`` [..., k]: the part of each token's lens logit that ``h`` carries (times ``sigma``)."""
        return h.to(self.vectors) @ self.vectors.T

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The lens logits of the tokens for states ``h`` [..., d], from the directions alone (exact before
        soft-capping; the tests check it against the lens's own decode)."""
        h = h.to(self.vectors)
        x = h @ self.matrix.T if self.matrix is not None else h
        if self.bias is not None:
            x = x + self.bias
        return (self.first_order(h) + self.offset) / self.norm.scale(x)[..., None] + self.constant


def model_norm(adapter) -> NormAffine:
    """The final norm's affine form (measured and proved once per adapter)."""
    cache = adapter.__dict__.setdefault("_norm_affine", {})
    if "norm" not in cache:
        cache["norm"] = norm_affine(adapter.final_norm, adapter.d_model, adapter.device,
                                    adapter.unembed.weight.dtype if adapter.unembed.weight.is_floating_point()
                                    else torch.float32, f"the final norm ({adapter.final_norm_path or 'found'})")
    return cache["norm"]


def directions(lens, layer: int, token_ids, dtype: torch.dtype = torch.float64) -> Directions:
    """`Directions` of ``token_ids`` (ints or a tensor) at ``layer`` of ``lens`` (attached to its model)."""
    adapter = lens.adapter
    if adapter is None:
        raise LensesError("this lens has no model attached: call lens.attach(model) first.")
    if not 0 <= layer <= lens.num_layers:
        raise LensesError(f"layer {layer} is out of range: this model has hidden states 0..{lens.num_layers}.")
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if len(ids) and not (0 <= int(ids.min()) and int(ids.max()) < adapter.vocab_size):
        raise LensesError(f"token ids must lie in 0..{adapter.vocab_size - 1} (got {ids.tolist()[:5]}...).")
    matrix, bias = (None, None) if layer == lens.num_layers else lens.affine(layer)
    norm = model_norm(adapter)
    scale = float(getattr(adapter, "logit_scale", 1.0) or 1.0)
    W = adapter.unembed_rows(ids.to(adapter.device)).to(dtype).cpu()  # [k, d]
    readout = scale * norm.centre(norm.weight.to(dtype) * W)
    matrix = matrix.detach().to(dtype).cpu() if matrix is not None else None
    bias = bias.detach().to(dtype).cpu() if bias is not None else None
    vectors = readout @ matrix if matrix is not None else readout
    ubias = adapter.unembed.bias
    constant = scale * (W @ norm.bias.to(dtype) + (ubias.detach()[ids.to(ubias.device)].to(dtype).cpu()
                                                   if ubias is not None else 0.0))
    offset = readout @ bias if bias is not None else torch.zeros(len(ids), dtype=dtype)
    return Directions(layer, ids, vectors, readout, offset, constant, matrix, bias, norm)
