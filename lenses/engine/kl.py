"""KL to the model's own distribution, with its gradient, and the statistics of a row of logits.

`kl_backward` trains a lens: one matmul for the logits, one fused element-wise pass (`kernels`), one
matmul to push ``dz`` back through the unembedding, so autograd never sees the vocabulary (eager PyTorch
would make ~10 memory passes; the kernel recomputes ``exp`` rather than storing a float32 copy of the
logits). `kl_rows` evaluates; `row_stats` is what tracing reads of each row.
"""

from __future__ import annotations

import torch

from lenses.engine.decoding import Teacher, blocks, unembed
from lenses.engine.dtypes import default_chunk_rows
from lenses.engine.kernels import KERNELS
from lenses.engine.protocol import Readout


def kl_rows(adapter: Readout, h: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor,
            dtype: torch.dtype = torch.float32):
    """KL(p || q) [G, C] and the lens top-1 ids [G, C] for lens outputs ``h`` [G, C, d] (states the
    final norm reads) vs teacher rows ``p``, ``neg_entropy`` (see `Teacher`). (Scale and soft-cap are
    monotone, so the raw argmax is the top-1.)"""
    with torch.no_grad():
        z = unembed(adapter, adapter.final_norm(h), dtype)
        kl, _ = KERNELS["kl"](z, p, neg_entropy, None, adapter.logit_scale, adapter.softcap or 0.0, False)
        return kl, z.argmax(-1)


def kl_and_grad(adapter: Readout, u: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor,
                row_weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """KL per row [G, C] and d(sum_rows row_weight * KL)/du [G, C, d] for a chunk.

    ``u``: normalised lens states of G layers at C positions; ``p``, ``neg_entropy``: teacher rows
    of those positions (see `Teacher`); ``row_weight``: per-position factor [C] (loss weight /
    number of positions). One matmul for the logits, one fused element-wise pass, one matmul to
    push ``dz`` back through the unembedding: autograd never sees the vocabulary.
    """
    with torch.no_grad():
        z = unembed(adapter, u, dtype)
        kl, dz = KERNELS["kl"](z, p, neg_entropy, row_weight, adapter.logit_scale, adapter.softcap or 0.0, True)
        grad_u = (dz @ adapter.unembed_weight(dtype)).to(u.dtype)
    return kl, grad_u


def kl_backward(adapter: Readout, h: torch.Tensor, h_last: torch.Tensor, pos_weight: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32, chunk_rows: int | None = None,
                teacher_positions: int = 256) -> torch.Tensor:
    """Backpropagate sum_g mean_pos(w * KL(final || lens)) into lens outputs ``h`` [G, N, d] (tracked
    by autograd); return the KL [G, N]. ``h_last``: the model's last hidden states [N, d] (the teacher).

    The teacher is decoded ``teacher_positions`` at a time; the lens in chunks of about ``chunk_rows``
    rows (all G layers x a few positions): see the module docstring for why both are small. Autograd
    sees only the final norm; the vocabulary part is `kl_and_grad`.
    """
    G, N = h.shape[0], h.shape[1]
    chunk_rows = chunk_rows or default_chunk_rows(adapter, dtype)
    u = adapter.final_norm(h)  # [G, N, d]
    grad_u = torch.empty_like(u)
    kl = torch.empty(G, N, device=h.device)
    w_all = torch.full((N,), 1.0 / N, device=h.device) if pos_weight is None else pos_weight / N
    for b0, b1 in blocks(0, N, teacher_positions):
        teacher = Teacher(adapter, h_last[b0:b1])
        for s, e in blocks(b0, b1, max(1, chunk_rows // G)):
            p, neg_h = teacher.rows(s - b0, e - b0)
            kl[:, s:e], grad_u[:, s:e] = kl_and_grad(adapter, u[:, s:e].detach(), p, neg_h, w_all[s:e], dtype)
    u.backward(grad_u)
    return kl


def row_stats(z: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor, t_ids: torch.Tensor):
    """`_row_stats` through the compiled kernel (see there; rule 2 of `kernels` for one row)."""
    n_t = t_ids.shape[1]
    out = KERNELS["stats"](z, p, neg_entropy, _two_or_more(t_ids))
    return (*out[:4], out[4][:, :n_t], out[5][:, :n_t])



def _two_or_more(t_ids: torch.Tensor) -> torch.Tensor:
    """Target ids [C, n] padded with token 0 to at least two columns (rule 3 of `kernels`); the padding's
    columns are dropped from the results."""
    if t_ids.shape[1] >= 2:
        return t_ids
    return torch.cat([t_ids, t_ids.new_zeros(t_ids.shape[0], 2 - t_ids.shape[1])], 1)
