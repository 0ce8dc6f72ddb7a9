"""KL(final || lens) and its gradient, formed chunk by chunk without autograd through the vocabulary.

For lens logits ``z`` and teacher distribution ``p``: ``KL = sum_v p (log p - log softmax(z))``
and ``dKL/dz = softmax(z) - p``. Per chunk of rows we do one matmul for the logits, one fused
element-wise pass (soft-max statistics, KL, ``q - p``) and one matmul to push the gradient back
through the unembedding (``dz @ W_U``). Autograd only sees the cheap part (translator + final
norm); memory is O(chunk x vocab).

Speed comes from two choices (measured in ``benchmarks/run.py``):
- the element-wise pass is compiled with ``torch.compile`` when a compiler is available (eager
  PyTorch makes ~10 memory passes; ``LENSES_COMPILE=0`` forces eager). It is written so that the
  compiler recomputes ``exp`` rather than storing a float32 copy of the logits;
- on CPU with 16-bit matmuls, chunks are small (`default_chunk_rows`: ~24 MB of logits, e.g.
  8 positions x 30 layers) so that the logits, written by the first matmul, are still in the CPU's
  cache when the element-wise pass and the second matmul read them. The teacher is decoded for larger blocks of positions, where its float32 matmul is
  efficient, and shared by every chunk inside the block.
"""

from __future__ import annotations

import os
import warnings

import torch

from .models import ModelAdapter


class Teacher:
    """The model's own output distribution for a block of positions: probabilities ``p`` [P, V]
    and ``neg_entropy`` = sum p log p [P], both float32. Rows are sliced per chunk."""

    def __init__(self, adapter: ModelAdapter, h_last: torch.Tensor):
        with torch.no_grad():
            logp = torch.log_softmax(adapter.decode(h_last).float(), dim=-1)
            self.p = logp.exp()
            self.neg_entropy = (self.p * logp).sum(-1)

    def rows(self, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.p[s:e], self.neg_entropy[s:e]

    @property
    def top1(self) -> torch.Tensor:
        return self.p.argmax(-1)


def _kl_and_dz(z, p, neg_entropy, row_weight, scale: float, softcap: float, want_grad: bool):
    """KL [G, C] and (if ``want_grad``) ``row_weight * dKL/dz`` [G, C, V] in ``z``'s dtype.

    ``z``: raw unembedding output [G, C, V]; ``p``: teacher probs [C, V]; ``neg_entropy``:
    sum p log p [C]; ``scale``/``softcap``: what the model applies after the unembedding.
    Logits are shifted by their row maximum before any sum, so large logits do not cancel.
    """
    zf = z.float()
    if scale != 1.0:
        zf = zf * scale
    if softcap:
        t = torch.tanh(zf / softcap)
        zf = t * softcap
    zs = zf - zf.amax(-1, keepdim=True)  # <= 0
    log_s = torch.log(torch.exp(zs).sum(-1, keepdim=True))
    kl = neg_entropy + log_s.squeeze(-1) - (zs * p).sum(-1)  # sum p log p - sum p log q
    if not want_grad:
        return kl, None
    g = (torch.exp(zs - log_s) - p) * row_weight[:, None]  # exp recomputed: no [G, C, V] float32 buffer
    if softcap:
        g = g * (1 - t * t)
    if scale != 1.0:
        g = g * scale
    return kl, g.to(z.dtype)


class maybe_compiled:
    """``fn`` compiled with ``torch.compile`` on first use if possible, else (no C++ compiler,
    unsupported platform, ``LENSES_COMPILE=0``) the same function run eagerly, for good."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = self.fn
            if os.environ.get("LENSES_COMPILE", "1") != "0":
                self.compiled = torch.compile(self.fn, dynamic=True)
        if self.compiled is not self.fn:
            try:
                return self.compiled(*args)
            except Exception as e:
                warnings.warn(f"torch.compile unavailable ({type(e).__name__}); using the slower eager kernel")
                self.compiled = self.fn
        return self.fn(*args)


_fused = maybe_compiled(_kl_and_dz)


def _unembed_raw(adapter: ModelAdapter, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Flatten first: a strided [G, C, d] slice would otherwise run as G small batched matmuls,
    # each streaming the whole unembedding from memory (measured 4x slower in float32).
    flat = u.to(dtype).reshape(-1, u.shape[-1])
    z = (flat @ adapter.unembed_weight(dtype).T).view(*u.shape[:-1], -1)
    if adapter.unembed.bias is not None:
        z = z + adapter.unembed.bias.to(dtype)
    return z


def default_chunk_rows(adapter: ModelAdapter, dtype: torch.dtype) -> int:
    """Rows per vocabulary chunk, from a byte budget for the ``[rows x V]`` logits.

    On a CPU with 16-bit matmuls, ~24 MB keeps the logits in the last-level cache between the
    matmul and the element-wise pass (240 rows for SmolLM2: 25% faster than 2,048 rows, measured);
    float32 and GPUs prefer bigger matmuls (2,048 rows of float32 for SmolLM2, ~400 MB).
    """
    small = adapter.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    budget = 24 * 2**20 if small else 400 * 2**20
    return max(1, budget // (adapter.vocab_size * torch.finfo(dtype).bits // 8))


def kl_rows(adapter: ModelAdapter, u: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor,
            dtype: torch.dtype = torch.float32):
    """KL(p || q) [G, C] and the lens top-1 ids [G, C] for normalised lens states ``u`` [G, C, d]
    vs teacher rows ``p``, ``neg_entropy`` (see `Teacher`). (Scale and soft-cap are monotone, so the
    raw argmax is the top-1.)"""
    with torch.no_grad():
        z = _unembed_raw(adapter, u, dtype)
        kl, _ = _fused(z, p, neg_entropy, None, adapter.logit_scale, adapter.softcap or 0.0, False)
        return kl, z.argmax(-1)


def teacher_top1(adapter: ModelAdapter, h_last: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """The model's own top-1 token [N] at each of N positions, decoded chunk by chunk."""
    with torch.no_grad():
        return torch.cat([adapter.decode(h_last[s : s + chunk]).argmax(-1) for s in range(0, h_last.shape[0], chunk)])


def kl_and_grad(
    adapter: ModelAdapter,
    u: torch.Tensor,
    p: torch.Tensor,
    neg_entropy: torch.Tensor,
    row_weight: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL per row [G, C] and d(sum_rows row_weight * KL)/du [G, C, d] for a chunk.

    ``u``: normalised lens states of G layers at C positions; ``p``, ``neg_entropy``: teacher rows
    of those positions (see `Teacher`); ``row_weight``: per-position factor [C] (loss weight /
    number of positions).
    """
    with torch.no_grad():
        z = _unembed_raw(adapter, u, dtype)
        kl, dz = _fused(z, p, neg_entropy, row_weight, adapter.logit_scale, adapter.softcap or 0.0, True)
        grad_u = (dz @ adapter.unembed_weight(dtype)).to(u.dtype)
    return kl, grad_u
