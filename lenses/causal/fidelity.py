"""Causal fidelity (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens",
section 5): which directions a lens relies on, and whether the model relies on them too.

- `causal_basis(lens, h, layer, k)`: ``k`` orthonormal directions found one at a time, each maximising the
  mean KL of the lens's distribution after ablating it (mean ablation by default) from the lens's own
  distribution, orthogonal to those found before (L-BFGS with a strong-Wolfe line search on the unit sphere;
  the same procedure as tuned-lens 0.2's ``extract_causal_bases``). Returned by decreasing energy (that KL).
- `aitchison`: the cosine of two changes of distribution in centred log-ratio coordinates
  (``clr(p) = log p - mean(log p)``): +1 when the model's output moves the way the lens's reading moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lenses.base.errors import LensesError
from lenses.causal.edits import remove_subspace


@dataclass
class CausalBasis:
    energies: torch.Tensor  # [k] mean KL of the lens's distribution when each direction is ablated
    vectors: torch.Tensor  # [d, k] orthonormal columns, by decreasing energy


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def default_init(lens, layer: int, k: int) -> torch.Tensor:
    """Starting directions: the top ``k`` left singular vectors of the unembedding's rows pulled back through
    the lens's linear map (for the logit lens, of ``W_U^T``, as tuned-lens starts)."""
    W = lens.adapter.unembed_plain().float().T  # [d, V]
    matrix = None if layer == lens.num_layers else lens.affine(layer)[0]
    U = matrix.float().T @ W if matrix is not None else W
    return torch.linalg.svd(U, full_matrices=False)[0][:, :k].float()


def causal_basis(lens, h: torch.Tensor, layer: int, k: int = 1, mode: str = "mean", max_iter: int = 100,
                 init: torch.Tensor | None = None) -> CausalBasis:
    """The ``k`` directions of ``hidden[layer]`` (states ``h`` [N, d]) the lens's reading depends on most."""
    h = h.detach().float().reshape(-1, h.shape[-1])
    d = h.shape[-1]
    if not 1 <= k <= d:
        raise LensesError(f"a causal basis of {k} directions in {d} dimensions: ask for 1..{d} (a few are the point).")
    with torch.no_grad():
        log_p = lens(h, layer).float().log_softmax(-1)
    vectors = (init if init is not None else default_init(lens, layer, k)).float().clone()[:, :k]
    energies = torch.zeros(k)
    eye = torch.eye(d)
    for j in range(k):
        proj = eye - vectors[:, :j] @ vectors[:, :j].T if j else eye

        def unit(x, proj=proj):
            x = proj @ x
            return x / (x.norm() + torch.finfo(x.dtype).eps)

        v = torch.nn.Parameter(unit(vectors[:, j]))
        energies[j] = _maximise(lens, h, layer, log_p, v, unit, mode, max_iter)
        vectors[:, j] = unit(v.data)
    order = energies.argsort(descending=True)
    return CausalBasis(energies[order], vectors[:, order])


def _maximise(lens, h, layer, log_p, v, unit, mode: str, max_iter: int) -> float:
    """Run L-BFGS on ``v`` (in place) to maximise the ablation KL; the energy reached."""
    opt = torch.optim.LBFGS([v], line_search_fn="strong_wolfe", max_iter=max_iter)
    state = {"calls": 0, "energy": 0.0, "change": 0.0}

    def closure():
        state["calls"] += 1
        opt.zero_grad(set_to_none=False)
        log_q = lens(remove_subspace(h, unit(v), mode=mode, orthonormal=True), layer).float().log_softmax(-1)
        loss = -_kl(log_p, log_q)
        loss.backward()
        energy = -float(loss.detach())
        state["change"], state["energy"] = energy - state["energy"], energy
        return loss

    while state["calls"] < max_iter:
        opt.step(closure)
        v.data = unit(v.data)
        if state["energy"] == 0 or abs(state["change"] / state["energy"]) < 1e-4:
            break
    return state["energy"]


def clr(log_p: torch.Tensor) -> torch.Tensor:
    """Centred log-ratio coordinates of distributions given as log-probabilities [..., V]."""
    return log_p - log_p.mean(-1, keepdim=True)


def aitchison(log_p0: torch.Tensor, log_p1: torch.Tensor, log_q0: torch.Tensor, log_q1: torch.Tensor) -> torch.Tensor:
    """Per row: the Aitchison cosine between the change ``p0 -> p1`` and the change ``q0 -> q1`` [...]."""
    a, b = clr(log_p1) - clr(log_p0), clr(log_q1) - clr(log_q0)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The principal angles (radians, ascending) between the column spans of ``A`` and ``B`` [d, k]."""
    qa, qb = torch.linalg.qr(A.double())[0], torch.linalg.qr(B.double())[0]
    return torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1)).flip(0)
