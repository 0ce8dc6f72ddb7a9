"""Sparse non-negative decomposition of a state over a lens's token dictionary, and coordinate patching
(the J-space decomposition of Gurnee et al. 2026; any lens whose directions form a dictionary).

The dictionary is ``[atoms, d]``: the lens's directions of every token at a layer (`Lens.directions`), or any
other rows. ``decompose(x, D, k)`` selects greedily, at most ``k`` times, the unselected atom whose *unit*
vector best correlates with the residual, stopping once no atom correlates by more than ``sqrt(eps32) ||x||``
(a non-negative coefficient could not reduce the residual), and updates the coefficients by

- ``nomp`` (default): the non-negative least-squares re-solve on the selected atoms (Lawson & Hanson 1974's
  active-set method, float64);
- ``gradient``: one projected gradient step with the exact line search (Blumensath & Davies 2008), halved
  until the residual does not grow.

The *support* is the selected atoms whose contribution ``c_i ||v_i||`` exceeds ``sqrt(eps64) ||x||``.
``patch_coordinate`` edits the coordinate frame the decomposition recovered (the support, with the target
atom appended at 0 when absent): ``substitute`` moves the source's coordinate to the target and zeroes the
source, ``swap`` exchanges them; blended by ``alpha``; the state moves by ``basis @ (after - before)``, so the
residual off the frame is kept. TransformerLens 4.3's ``get_sparse_decomposition`` and
``solve_coordinate_patch`` define the same quantities; the tests compare them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lenses.base.errors import LensesError
from lenses.causal.edits import check_alpha

CORRELATION_TOL = math.sqrt(torch.finfo(torch.float32).eps)
ACTIVE_TOL = math.sqrt(torch.finfo(torch.float64).eps)
ALGORITHMS = ("nomp", "gradient")


@dataclass
class Decomposition:
    support: torch.Tensor  # [s] atom ids with a material coordinate, in selection order
    coordinates: torch.Tensor  # [s] >= 0
    selected: torch.Tensor  # [m] every selected atom (m >= s)
    reconstruction: torch.Tensor  # [d] sum of coordinates * atoms
    component: torch.Tensor  # [d] the projection of x on the span of the selected atoms
    residual: torch.Tensor  # [d] x - component


def nnls(A: torch.Tensor, b: torch.Tensor, max_iter: int | None = None) -> torch.Tensor:
    """``argmin ||A c - b||`` over ``c >= 0`` (A [d, n], b [d]; float64 active-set method)."""
    A, b = A.double(), b.double()
    n = A.shape[1]
    c = torch.zeros(n, dtype=torch.float64)
    free = torch.zeros(n, dtype=torch.bool)
    tol = 10 * n * torch.finfo(torch.float64).eps * float(A.abs().max() * b.abs().max() + 1)
    for _ in range(max_iter or 3 * n + 10):
        w = A.T @ (b - A @ c)
        if bool(free.all()) or float(w.masked_fill(free, -math.inf).max()) <= tol:
            break
        free[int(w.masked_fill(free, -math.inf).argmax())] = True
        while True:
            z = torch.zeros(n, dtype=torch.float64)
            z[free] = torch.linalg.lstsq(A[:, free], b[:, None]).solution[:, 0]
            if bool((z[free] > 0).all()):
                c = z
                break
            bad = free & (z <= 0)
            step = float((c[bad] / (c[bad] - z[bad])).min())
            c = c + step * (z - c)
            free &= c > tol
            c[~free] = 0.0
    return c


def _gradient_step(A: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    r = x - A @ c
    g = A.T @ r
    Ag = A @ g
    den = float(Ag @ Ag)
    if den <= 0:
        return c.clamp_min(0)
    step, now = float(Ag @ r) / den, float(r @ r)
    for _ in range(21):
        trial = (c + step * g).clamp_min(0)
        rt = x - A @ trial
        if float(rt @ rt) <= now:
            return trial
        step /= 2
    return c.clamp_min(0)


def decompose(x: torch.Tensor, dictionary: torch.Tensor, k: int = 25, algorithm: str = "nomp",
              dtype: torch.dtype = torch.float64) -> Decomposition:
    """The sparse non-negative decomposition of ``x`` [d] over the rows of ``dictionary`` (module docstring).
    ``dtype``: of the scan over every atom (float32 halves its time on a large vocabulary); the coefficients are
    always solved in float64."""
    if algorithm not in ALGORITHMS:
        raise LensesError(f"unknown decomposition {algorithm!r}; choose one of {', '.join(ALGORITHMS)}.")
    D = dictionary.to(dtype)
    x = x.to(dtype).reshape(-1)
    if D.dim() != 2 or D.shape[1] != x.shape[0]:
        raise LensesError(f"the dictionary is {tuple(D.shape)}, the state has {x.shape[0]} dimensions: the "
                          "dictionary's rows must be states of the same width.")
    if not 1 <= k <= D.shape[0]:
        raise LensesError(f"k must lie in 1..{D.shape[0]} (the number of atoms); got {k}.")
    norms = D.norm(dim=1)
    if not bool(torch.isfinite(D.abs().amax() + x.abs().amax())) or bool((norms == 0).any()):  # amax keeps NaN
        raise LensesError("the state and the dictionary must be finite, and no atom may be zero.")
    xnorm = float(x.double().norm())
    selected: list[int] = []
    c = torch.zeros(0, dtype=torch.float64)
    r = x.clone()
    for _ in range(k):
        corr = (D @ r) / norms
        corr = corr.double()
        if selected:
            corr[selected] = -math.inf
        best = int(corr.argmax())
        if float(corr[best]) <= CORRELATION_TOL * xnorm:
            break
        selected.append(best)
        A, xd = D[selected].T.double(), x.double()
        c = nnls(A, xd) if algorithm == "nomp" else _gradient_step(A, xd, torch.cat([c, c.new_zeros(1)]))
        r = (xd - A @ c).to(dtype)
    A, x = D[selected].T.double(), x.double()
    active = c * norms[selected] > ACTIVE_TOL * xnorm
    chosen = torch.tensor(selected, dtype=torch.long)
    component = A @ torch.linalg.lstsq(A, x[:, None]).solution[:, 0] if selected else torch.zeros_like(x)
    return Decomposition(chosen[active], c[active], chosen, A[:, active] @ c[active], component, x - component)


@dataclass
class CoordinatePatch:
    frame: torch.Tensor  # [s'] atom ids: the support, the target appended when absent
    before: torch.Tensor  # [s'] coordinates
    after: torch.Tensor  # [s'] coordinates after the edit
    delta: torch.Tensor  # [d] basis @ (after - before)
    patched: torch.Tensor  # [d] x + delta


def patch_coordinate(x: torch.Tensor, dictionary: torch.Tensor, source: int, target: int, mode: str = "swap",
                     alpha: float = 1.0, k: int = 25, algorithm: str = "nomp",
                     decomposition: Decomposition | None = None) -> CoordinatePatch:
    """Move ``source``'s coordinate to ``target`` (``substitute``) or exchange them (``swap``), by ``alpha``."""
    if mode not in ("swap", "substitute"):
        raise LensesError(f"unknown coordinate patch {mode!r}; choose swap or substitute.")
    alpha = check_alpha(alpha)
    if source == target:
        raise LensesError(f"the source and target atoms are the same ({source}); choose two different tokens.")
    dec = decomposition or decompose(x, dictionary, k, algorithm)
    frame = dec.support.tolist()
    if source not in frame:
        raise LensesError(f"atom {source} is not in the state's decomposition (support {frame[:10]}): there is "
                          "no coordinate of it to move; raise k or choose a token the state carries.")
    before = dec.coordinates.clone()
    if target not in frame:
        frame.append(target)
        before = torch.cat([before, before.new_zeros(1)])
    s, t = frame.index(source), frame.index(target)
    edited = before.clone()
    edited[s] = before[t] if mode == "swap" else 0.0
    edited[t] = before[s]
    after = before + alpha * (edited - before)
    ids = torch.tensor(frame, dtype=torch.long)
    delta = dictionary[ids].double().T @ (after - before)
    return CoordinatePatch(ids, before, after, delta, x.double().reshape(-1) + delta)
