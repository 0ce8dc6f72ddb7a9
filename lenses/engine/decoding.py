"""Decoding: residual-stream states to logits through the model's final norm and unembedding.

`decode` is the one path from a state to logits (final norm, unembedding matmul in a chosen dtype, then
what the model does to its logits: Cohere/Granite logit scaling, Gemma 2/3 soft-capping, in float32);
`Teacher` is the model's own distribution for a block of positions, decoded once and shared by every
chunk, layer and lens inside the block; `top_ids` finds the top-k ids of wide rows cheaply.

On CPU with 16-bit matmuls, chunks are small (~24 MB of logits, `dtypes.default_chunk_rows`) so that the
logits, written by the first matmul, are still in the CPU's cache when the element-wise pass and the second
matmul read them; the teacher is decoded for larger blocks of positions, where its float32 matmul is
efficient (measured in ``benchmarks/run.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lenses.engine.kernels import KERNELS
from lenses.engine.protocol import Readout

VOCAB_BLOCK = 2048  # CPU float32: vocabulary columns per matmul (see `unembed`)


def unembed(adapter: Readout, u: torch.Tensor, dtype: torch.dtype | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw unembedding output (no scale, no soft-cap) of normalised states ``u`` [..., d] in ``dtype``
    (default: the unembedding's own dtype). ``out`` [N, V]: a buffer to write the CPU float32 output into
    (a fresh 50 MB tensor costs ~14 ms of page faults here: a caller decoding many chunks reuses one)."""
    dtype = dtype or adapter.unembed.weight.dtype
    bias = adapter.unembed.bias
    bias = None if bias is None else bias.to(dtype)
    # Flatten first: a strided [G, C, d] slice would otherwise run as G small batched matmuls,
    # each streaming the whole unembedding from memory (measured 4x slower in float32).
    flat = u.to(dtype).reshape(-1, u.shape[-1])
    w = adapter.unembed_weight(dtype)
    tracked = torch.is_grad_enabled() and (flat.requires_grad or w.requires_grad)
    if flat.device.type == "cpu" and dtype == torch.float32 and w.shape[0] > 2 * VOCAB_BLOCK and not tracked:
        # float32 on CPU: `VOCAB_BLOCK` columns at a time, each block's output still in cache when it is
        # stored (1.3x faster than one matmul for SmolLM2's 49,152 columns; bfloat16 gains nothing)
        z = out if out is not None and out.shape == (flat.shape[0], w.shape[0]) else flat.new_empty(
            flat.shape[0], w.shape[0])
        for s, e in blocks(0, w.shape[0], VOCAB_BLOCK):
            if bias is None:
                torch.mm(flat, w[s:e].t(), out=z[:, s:e])
            else:
                torch.addmm(bias[s:e], flat, w[s:e].t(), out=z[:, s:e])
    else:
        z = F.linear(flat, w, bias)
    return z.view(*u.shape[:-1], -1)


def finish(adapter: Readout, z: torch.Tensor) -> torch.Tensor:
    """What the model does after the unembedding matmul: logit scaling, then soft-capping."""
    if adapter.logit_scale != 1.0:
        z = z * adapter.logit_scale
    if adapter.softcap:
        z = torch.tanh(z / adapter.softcap) * adapter.softcap
    return z


def decode(adapter: Readout, h: torch.Tensor, dtype: torch.dtype | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (float32, or float64 for a float64 model) for residual-stream states ``h`` [..., d]: final
    norm, unembedding (matmul in ``dtype``; ``out``: see `unembed`), scale and soft-cap.
    ``decode(adapter, hidden[L])`` equals the model's logits."""
    z = unembed(adapter, adapter.final_norm(h), dtype, out)
    return finish(adapter, z.to(torch.promote_types(z.dtype, torch.float32)))



TOPK_BLOCK = 64  # `top_ids`: columns per block


def top_ids(z: torch.Tensor, k: int) -> torch.Tensor:
    """The ids [C, k] of the ``k`` highest entries of each row of ``z`` [C, V] (any order, ties broken either
    way), as ``z.topk(k).indices`` but in two cheap steps on a wide row: a bound on each block of `TOPK_BLOCK`
    columns (`_block_max`, one compiled pass), then the top ``k`` among the ``k + 1`` best blocks. Exact: each of
    the ``k`` highest entries lies in a block whose bound is at least as high, at most ``k`` blocks have one,
    and only one bound (the last block's) can be higher than its own columns, taking one place."""
    C, V = z.shape
    B = TOPK_BLOCK
    if V < 16 * k * B or z.device.type != "cpu":  # narrow rows, and GPUs, where topk itself is fast
        return z.topk(k, dim=-1).indices
    best = KERNELS["block_max"](z, B)  # [C, V // B + 1]
    blocks_ = best.topk(k + 1, dim=-1).indices  # [C, k + 1]
    cols = (blocks_[:, :, None] * B + torch.arange(B, device=z.device)).view(C, -1)  # [C, (k + 1) * B]
    vals = z.gather(1, cols.clamp_max(V - 1))
    vals = vals.masked_fill(cols >= V, float("-inf"))  # columns past the row (the last block's) are never picked
    return cols.gather(1, vals.topk(k, dim=-1).indices)



class Teacher:
    """The model's own output distribution for a block of positions: probabilities ``p`` [P, V]
    and ``neg_entropy`` = sum p log p [P], both float32. Rows are sliced per chunk."""

    def __init__(self, adapter: Readout, h_last: torch.Tensor, dtype: torch.dtype | None = None,
                 keep_logits: bool = False):
        with torch.no_grad():
            z = decode(adapter, h_last, dtype)
            self.logits = z if keep_logits else None  # [P, V]: the model's own logits, for whoever reads them
            logp = torch.log_softmax(z, dim=-1)
            self.p = logp.exp()
            self.neg_entropy = (self.p * logp).sum(-1)

    def rows(self, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.p[s:e], self.neg_entropy[s:e]

    @property
    def top1(self) -> torch.Tensor:
        return self.p.argmax(-1)



def blocks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive blocks of ``size`` covering ``range(start, stop)``."""
    return [(s, min(stop, s + size)) for s in range(start, stop, size)]

