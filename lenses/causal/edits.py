"""Edits of a residual-stream state along directions: ablation and steering, for one position or all.

Each function here returns an *edit*, ``h [batch, seq, d] -> h'``, for `lenses.model.intervene.edit_residual`
(``{layer: edit}``), which runs the model on from the edited ``hidden[layer]``; `run_edited` does that and
returns the model's final logits. Directions come from any lens (`Lens.directions`), from a causal basis
(`lenses.causal.fidelity.causal_basis`) or from anywhere else.

- ``ablate(A)``: remove the span of the columns of ``A`` [d, k] (or one vector [d]):
  ``zero``: project it out, ``h - P h``; ``mean``: set the component to its mean over ``samples``,
  ``h - P (h - mean)``; ``resample``: to another sample's component (tuned-lens's ``remove_subspace``
  modes, Belrose et al. 2023, section 5).
- ``steer(v, alpha)``: ``h + alpha v``. ``alpha = 0`` returns ``h`` itself (bit-identical).
"""

from __future__ import annotations

import math

import torch

from lenses.base.errors import LensesError
from lenses.model.intervene import edit_residual, final_logits

MODES = ("zero", "mean", "resample")


def projector(A: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector [d, d] onto the span of the columns of ``A`` [d, k] (or a vector [d])."""
    A = A[:, None] if A.dim() == 1 else A
    Q, R = torch.linalg.qr(A.double())
    keep = R.diagonal().abs() > 1e-12 * R.diagonal().abs().max().clamp_min(1e-300)
    Q = Q[:, keep]
    return Q @ Q.T


def remove_subspace(h: torch.Tensor, A: torch.Tensor, mode: str = "zero", samples: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, orthonormal: bool = False) -> torch.Tensor:
    """``h`` [..., d] with the span of ``A`` ablated by ``mode`` (``samples`` [n, d]: the states whose mean or
    whose components replace it; default ``h``'s own rows). ``orthonormal``: ``A``'s columns are (the projector
    is ``A A^T``, differentiable in ``A``, as the causal-basis search needs)."""
    if mode not in MODES:
        raise LensesError(f"unknown ablation mode {mode!r}; choose one of {', '.join(MODES)}.")
    if orthonormal:
        A = A[:, None] if A.dim() == 1 else A
        P = A @ A.T
    else:
        P = projector(A).to(h)
    if mode == "zero":
        return h - h @ P
    rows = (h if samples is None else samples).reshape(-1, h.shape[-1]).to(h)
    if len(rows) < 2:
        raise LensesError(f"{mode} ablation needs at least 2 states to take the {mode} of; give more samples.")
    if mode == "mean":
        return h + (rows.mean(0) - h) @ P
    flat = h.reshape(-1, h.shape[-1])
    pick = _derangement(len(rows), generator)[torch.arange(len(flat)) % len(rows)]
    return (flat + (rows[pick] - flat) @ P).reshape(h.shape)


def _derangement(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random permutation of 0..n-1 without fixed points (rejection: about e draws; a cyclic shift after 100)."""
    for _ in range(100):
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == torch.arange(n)).any()):
            return perm
    return torch.roll(torch.arange(n), 1)


def _at(position: int | None, fn):
    """An edit applying ``fn`` at ``position`` (None: every position) of ``h`` [batch, seq, d]."""
    def edit(h: torch.Tensor) -> torch.Tensor:
        if position is None:
            return fn(h)
        out = h.clone()
        out[:, position] = fn(h[:, position])
        return out

    return edit


def ablate(A: torch.Tensor, position: int | None = None, mode: str = "zero", samples: torch.Tensor | None = None,
           seed: int = 0):
    """An edit removing the span of ``A`` at ``position`` (None: all) by ``mode`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    return _at(position, lambda h: remove_subspace(h, A, mode, samples, generator))


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(float(alpha)):
        raise LensesError(f"alpha must be a finite number (got {alpha!r}); for example 1.0 or -2.")
    return float(alpha)


def steer(v: torch.Tensor, alpha: float, position: int | None = None):
    """An edit adding ``alpha * v`` at ``position`` (None: all); ``alpha = 0`` leaves ``h`` untouched."""
    alpha = check_alpha(alpha)
    if alpha == 0:
        return lambda h: h
    return _at(position, lambda h: h + alpha * v.to(h))


def run_edited(adapter, ids: torch.Tensor, edits: dict) -> torch.Tensor:
    """The model's logits [batch, seq, V] (float32) for ``ids`` with ``edits`` ({layer: edit}) applied."""
    with edit_residual(adapter, edits):
        return final_logits(adapter, ids)


def spaced_layers(num_layers: int, count: int, first: int = 1) -> list[int]:
    """``count`` evenly spaced layers of ``first..num_layers`` (the last always included)."""
    span = num_layers - first
    if count >= span + 1:
        return list(range(first, num_layers + 1))
    return sorted({first + round(i * span / max(count - 1, 1)) for i in range(count)} | {num_layers})


def per_row(index: tuple[torch.Tensor, torch.Tensor], fn):
    """An edit of ``h`` [batch, seq, d] at the positions ``index`` (batch ids, seq ids; N of them):
    ``h[index] <- fn(h[index])`` with ``fn`` mapping [N, d] to [N, d] (each row its own edit)."""
    def edit(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[index] = fn(h[index]).to(h)
        return out

    return edit


def project_out_rows(units: torch.Tensor):
    """``fn`` for `per_row`: each row ``x_i`` loses its component along its own unit vector ``units[i]``."""
    return lambda x: x - (x * units.to(x)).sum(-1, keepdim=True) * units.to(x)


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def random_units(n: int, d: int, seed: int) -> torch.Tensor:
    """``n`` random unit vectors in ``d`` dimensions (uniform on the sphere, seeded)."""
    return unit_rows(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def swap_pair(h: torch.Tensor, v_source: torch.Tensor, v_target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The coordinate swap of the J-lens paper (Gurnee et al. 2026): with ``V = [v_s, v_t]`` and the coordinates
    ``c = V^+ h`` of each state ``h`` [..., d] in their span, ``h + alpha V (swap(c) - c)``: the two tokens'
    coordinates exchange (``alpha = 1``; 2 is the paper's "double strength"), the part of ``h`` off the span is
    untouched. TransformerLens 4.3's ``JacobianLens.swap_hooks`` makes the same edit."""
    alpha = check_alpha(alpha)
    V = torch.stack([v_source, v_target], -1).to(torch.float64)  # [d, 2]
    c = torch.linalg.pinv(V) @ h.to(torch.float64).unsqueeze(-1)  # [..., 2, 1]
    delta = V @ (c.flip(-2) - c)
    return (h.to(torch.float64) + alpha * delta.squeeze(-1)).to(h.dtype)
