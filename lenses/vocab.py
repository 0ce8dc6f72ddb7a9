"""The vocabulary engine: the one place where residual-stream states become logits.

Every lens, in training, held-out evaluation and tracing, decodes through this module:

- `decode`: final norm, unembedding matmul in a chosen dtype, then what the model does to its
  logits (Cohere/Granite logit scaling, Gemma 2/3 soft-capping), in float32;
- `Teacher`: the model's own distribution for a block of positions, decoded once and shared by
  every chunk, layer and lens inside the block;
- two fused element-wise kernels over ``[rows x V]`` logits, both built on the same shifted
  soft-max helpers (logits minus their row maximum, so large logits do not cancel):
  `kl_and_grad` (training: KL and ``softmax(z) - p``) and `row_stats` (tracing: top-1, entropy,
  KL, ranks and probabilities of target tokens);
- the policies: `default_chunk_rows` (how many rows of logits to hold: a byte budget) and
  `compute_dtype` (which dtype the vocabulary matmuls run in: measured, not assumed).

Speed comes from two choices (measured in ``benchmarks/run.py``):
- the element-wise passes are compiled with ``torch.compile`` when a compiler is available (eager
  PyTorch makes ~10 memory passes; ``LENSES_COMPILE=0`` forces eager). The KL kernel recomputes
  ``exp`` rather than storing a float32 copy of the logits;
- on CPU with 16-bit matmuls, chunks are small (~24 MB of logits) so that the logits, written by
  the first matmul, are still in the CPU's cache when the element-wise pass and the second matmul
  read them. The teacher is decoded for larger blocks of positions, where its float32 matmul is
  efficient.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
import warnings
from typing import TYPE_CHECKING

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F

from . import lifecycle
from .errors import LensesError
from .io import cache_dir

if TYPE_CHECKING:
    from .models import ModelAdapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- decoding


VOCAB_BLOCK = 2048  # CPU float32: vocabulary columns per matmul (see `unembed`)


def unembed(adapter: "ModelAdapter", u: torch.Tensor, dtype: torch.dtype | None = None,
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


def finish(adapter: "ModelAdapter", z: torch.Tensor) -> torch.Tensor:
    """What the model does after the unembedding matmul: logit scaling, then soft-capping."""
    if adapter.logit_scale != 1.0:
        z = z * adapter.logit_scale
    if adapter.softcap:
        z = torch.tanh(z / adapter.softcap) * adapter.softcap
    return z


def decode(adapter: "ModelAdapter", h: torch.Tensor, dtype: torch.dtype | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (float32, or float64 for a float64 model) for residual-stream states ``h`` [..., d]: final
    norm, unembedding (matmul in ``dtype``; ``out``: see `unembed`), scale and soft-cap.
    ``decode(adapter, hidden[L])`` equals the model's logits."""
    z = unembed(adapter, adapter.final_norm(h), dtype, out)
    return finish(adapter, z.to(torch.promote_types(z.dtype, torch.float32)))


RESCORED = 32  # candidates per row re-scored in float32 by `decode_rescored`


def _exact(adapter: "ModelAdapter", u: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits (scaled, soft-capped) of normalised states ``u`` [C, d] for the tokens ``ids`` [C, k]."""
    z = KERNELS["gather_dot"](adapter.unembed_plain(), u.float(), ids)
    if adapter.unembed.bias is not None:
        z = z + adapter.unembed.bias[ids].float()
    return finish(adapter, z)


def _gather_dot(w: torch.Tensor, u: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[C, k]: the dot products of rows ``ids`` [C, k] of ``w`` [V, d] (in float32) with ``u`` [C, d] (float32).
    Compiled, the rows are read where they lie (a [C, k, d] copy and a batched matmul took 4x as long)."""
    rows = w[ids].float()
    if torch.compiler.is_compiling():
        return (rows * u[:, None, :]).sum(-1)
    return torch.bmm(rows, u[:, :, None]).squeeze(-1)


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
    if C == 1:  # a graph of its own for one row (see `_two_or_more`): the row twice
        return top_ids(_twice(z), k)[:1]
    best = KERNELS["block_max"](z, B)  # [C, V // B + 1]
    blocks_ = best.topk(k + 1, dim=-1).indices  # [C, k + 1]
    cols = (blocks_[:, :, None] * B + torch.arange(B, device=z.device)).view(C, -1)  # [C, (k + 1) * B]
    vals = z.gather(1, cols.clamp_max(V - 1))
    vals = vals.masked_fill(cols >= V, float("-inf"))  # columns past the row (the last block's) are never picked
    return cols.gather(1, vals.topk(k, dim=-1).indices)


def _block_max(z: torch.Tensor, B: int) -> torch.Tensor:
    """[C, V // B + 1]: the maximum of each whole block of ``B`` columns of ``z`` [C, V] (V >= B), then of the
    last ``B`` columns as the bound of the last block (columns ``V // B * B`` on; empty when B divides V): they
    hold its columns and overlap the block before, so the bound can exceed its own maximum, which `top_ids`
    allows for. No branch on ``V % B``: one compiled graph for every vocabulary size."""
    nb = z.shape[1] // B
    full = z[:, : nb * B].reshape(z.shape[0], nb, B).amax(-1)
    return torch.cat([full, z[:, -B:].amax(-1, keepdim=True)], 1)


def _rescore(adapter: "ModelAdapter", x: torch.Tensor, dtype: torch.dtype, targets: torch.Tensor | None,
             candidates: int):
    """The 16-bit half of `decode_rescored`: ``(z16, u, ids, exact, keep, redo)``. ``z16`` [C, V]: the raw
    16-bit unembedding output; ``u``: the normalised states; ``ids`` [C, S]: each row's targets, then its
    ``candidates`` highest tokens; ``exact`` [C, S]: their float32 logits (scaled, soft-capped); ``keep``
    [C, S]: the first time an id appears on its row; ``redo`` [C]: rows whose top-1 the 16-bit error could
    change (a token outside the candidates within the error bound of the best)."""
    u = adapter.final_norm(x)
    z16 = unembed(adapter, u, dtype)
    k = min(candidates, z16.shape[-1])
    cand = top_ids(z16, k)
    rough = finish(adapter, z16.gather(1, cand).float())
    n_t = 0 if targets is None else targets.shape[1]
    ids = torch.cat([targets, cand], 1) if n_t else cand  # type: ignore[list-item]
    exact = _exact(adapter, u, ids)  # one call for targets and candidates: at least k columns, one kernel graph
    exact_c = exact[:, n_t:]
    # every other token's 16-bit logit is at most rough.min(); its error is bounded by twice the largest error
    # seen on this row's candidates plus the 16-bit output rounding (2^-8 relative)
    bound = 2 * (exact_c - rough).abs().amax(1) + 2**-8 * exact_c.abs().amax(1)
    redo = (exact_c.amax(1) - bound <= rough.amin(1) if k < z16.shape[-1]
            else torch.zeros_like(bound, dtype=torch.bool))
    same = ids[:, :, None] == ids[:, None, :]  # [C, S, S]: keep an id where no earlier column holds it
    keep = ~torch.tril(same, diagonal=-1).any(-1)
    return z16, u, ids, exact, keep, redo


def decode_rescored(adapter: "ModelAdapter", x: torch.Tensor, dtype: torch.dtype,
                    targets: torch.Tensor | None = None, candidates: int = RESCORED) -> tuple[torch.Tensor, int]:
    """Logits of states ``x`` [C, d] (before the final norm) with the vocabulary matmul in a 16-bit
    ``dtype``, made exact where the statistics read single tokens: the ``candidates`` highest tokens of
    each row and its ``targets`` [C, k] are re-scored in float32, and a row whose top-1 the 16-bit error
    could change (a token outside the candidates within the error bound of the best) is decoded whole in
    float32. So top-1 ids and target logits are float32's; every other logit carries the 16-bit matmul's
    error (~2^-8 relative). Returns ``(z, rows decoded whole)``. `rescored_stats` computes the statistics
    of these logits without making them."""
    if x.shape[0] == 1:  # one row: twice (the kernels would compile graphs for one row, see `rescored_stats`)
        z, n = decode_rescored(adapter, _twice(x), dtype, None if targets is None else _twice(targets), candidates)
        return z[:1], n // 2
    z16, _, ids, exact, keep, redo = _rescore(adapter, x, dtype, targets, candidates)
    z = finish(adapter, z16.float())
    n_t = 0 if targets is None else targets.shape[1]
    z.scatter_(1, ids[:, n_t:], exact[:, n_t:])
    z.scatter_(1, ids[:, :n_t], exact[:, :n_t])  # after the candidates: a target's own value wins
    n = int(redo.sum())
    if n:
        z[redo] = decode(adapter, x[redo], torch.float32).to(z.dtype)
    return z, n


def _two_or_more(t_ids: torch.Tensor) -> torch.Tensor:
    """Target ids [C, n] padded with token 0 to at least two columns, for `row_stats`'s compiled kernel: one
    graph for any number of targets (``torch.compile`` specialises sizes 0 and 1, each a compile of its own,
    ~10 s on a fresh machine); the padding's columns are dropped from the results. (`rescored_stats` passes
    a target count of at least 2 instead: its extra columns are candidates, whose results it drops.)"""
    if t_ids.shape[1] >= 2:
        return t_ids
    return torch.cat([t_ids, t_ids.new_zeros(t_ids.shape[0], 2 - t_ids.shape[1])], 1)


def _twice(t: torch.Tensor) -> torch.Tensor:
    """A one-row tensor's row twice (see `rescored_stats`)."""
    return t.expand(2, *t.shape[1:]).contiguous()


class _NoGroups:
    """`TokenGroups`'s kernel inputs when no groups are asked for, whose mass is dropped: 3 tokens in 2 groups
    of zeros, shaped as `TokenGroups`'s (no size 0 or 1: the compiled kernel keeps one graph; see
    `_two_or_more`)."""

    def __init__(self, device):
        self.cols = torch.arange(3, device=device)
        self.cols_onehot = torch.zeros(3, 2, device=device)
        self.big_onehot = torch.zeros(2, device=device)

    def of(self, ids: torch.Tensor) -> torch.Tensor:
        return self.cols_onehot.new_zeros(*ids.shape, 2)


class TokenGroups:
    """Token groups for the probability mass a distribution puts on each: ``groups`` [V] gives each token's
    group in ``0..n-1``, or ``n`` (or a negative value) for none. The mass is summed over the tokens outside
    the largest group (gathered: in the frequency view about 1,000 of 49,152) and the largest group's mass is
    the rest, so no second pass over a ``[C, V]`` row and no ``[C, V] @ [V, n]`` matmul is needed."""

    def __init__(self, groups: torch.Tensor, n: int):
        groups = torch.where(groups < 0, torch.full_like(groups, n), groups.long())
        self.n = n
        self.onehot = F.one_hot(groups, n + 1).float()  # [V, n + 1]: the last column collects the rest
        self.big = int(torch.bincount(groups, minlength=n + 1).argmax())
        self.cols = (groups != self.big).nonzero().flatten()  # [K]
        self.cols_onehot = self.onehot[self.cols]  # [K, n + 1]
        self.big_onehot = self.onehot.new_zeros(n + 1)
        self.big_onehot[self.big] = 1.0

    def of(self, ids: torch.Tensor) -> torch.Tensor:
        """One-hot groups [*ids.shape, n + 1] of the tokens ``ids``."""
        return self.onehot[ids.flatten()].view(*ids.shape, -1)

    def mass(self, z: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """The mass [C, n] of ``softmax(z)`` (float32 logits [C, V]) per group; ``top_p``: its highest
        probability [C], i.e. ``1 / sum exp(z - max)``, which `row_stats` computed already."""
        e = torch.exp(z[:, self.cols] - z.amax(-1, keepdim=True)) * top_p[:, None]  # [C, K] probabilities
        return (e @ self.cols_onehot + (1 - e.sum(-1))[:, None] * self.big_onehot)[:, : self.n]


def rescored_stats(adapter: "ModelAdapter", x: torch.Tensor, dtype: torch.dtype, p: torch.Tensor,
                   neg_entropy: torch.Tensor, t_ids: torch.Tensor, groups: "TokenGroups | None" = None,
                   candidates: int = RESCORED) -> tuple[tuple, int]:
    """`row_stats` (plus the probability mass per token group of ``groups``) of the logits `decode_rescored`
    would return, without making them: one compiled pass over the 16-bit logits sums the whole row, and the
    few re-scored tokens correct the sums (``sum over the row of f(exact) = sum of f(16-bit) - f(16-bit) at
    the re-scored tokens + f(exact) there``). Equal to ``row_stats(decode_rescored(...))`` within float32
    rounding (tests/test_trace.py), without the ``[C, V]`` float32 copy and its passes. Returns ``(stats,
    rows decoded whole)``; stats are `row_stats`'s tuple with the mass [C, n groups] (or None) appended."""
    if x.shape[0] == 1:  # one row: twice (the kernel would compile a graph for one row, see `_two_or_more`)
        x2, p2, neg2, t2 = map(_twice, (x, p, neg_entropy, t_ids))
        stats, n = rescored_stats(adapter, x2, dtype, p2, neg2, t2, groups, candidates)
        return tuple(None if s is None else s[:1] for s in stats), n // 2
    n_t = t_ids.shape[1]
    z16, _, ids, exact, keep, redo = _rescore(adapter, x, dtype, t_ids, candidates)
    g = groups if groups is not None else _NoGroups(ids.device)
    g = (g.cols, g.cols_onehot, g.big_onehot, g.of(ids))
    # n_targets of at least 2 (the candidates' extra columns dropped below): one compiled graph (see `_two_or_more`)
    out = list(KERNELS["rescored"](z16, ids, exact, keep, p, neg_entropy, max(n_t, 2), g, adapter.logit_scale,
                                   adapter.softcap or 0.0))
    out[4], out[5] = out[4][:, :n_t], out[5][:, :n_t]
    out[-1] = out[-1][:, : groups.n] if groups is not None else None
    n = int(redo.sum())
    if n:  # these rows the slow way: a float32 decode and the plain kernel
        rows = redo.nonzero().flatten()
        z = decode(adapter, x[rows], torch.float32)
        again = list(row_stats(z, p[rows], neg_entropy[rows], t_ids[rows]))
        if groups is not None:
            again.append(groups.mass(z, again[1]))
        for o, a in zip(out, again):
            if o is not None:
                o[rows] = a.to(o.dtype)
    return tuple(out), n


class Teacher:
    """The model's own output distribution for a block of positions: probabilities ``p`` [P, V]
    and ``neg_entropy`` = sum p log p [P], both float32. Rows are sliced per chunk."""

    def __init__(self, adapter: "ModelAdapter", h_last: torch.Tensor, dtype: torch.dtype | None = None,
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


def top1_ids(adapter: "ModelAdapter", x: torch.Tensor, dtype: torch.dtype | None = None,
             chunk: int = 512) -> torch.Tensor:
    """The top-1 token [N] of states ``x`` [N, d] through the model's final norm and unembedding (the
    model's own top-1 when ``x`` is its last hidden state), decoded chunk by chunk in ``dtype`` (None: the
    model's); a 16-bit ``dtype`` asked for is re-scored (`decode_rescored`), so the ids are float32's."""
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            if dtype in (torch.bfloat16, torch.float16):
                z, _ = decode_rescored(adapter, x[s : s + chunk], dtype)
            else:
                z = decode(adapter, x[s : s + chunk], dtype)
            out.append(z.argmax(-1))
    return torch.cat(out)


def blocks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive blocks of ``size`` covering ``range(start, stop)``."""
    return [(s, min(stop, s + size)) for s in range(start, stop, size)]


# --------------------------------------------------------------------------- fused kernels


def _shifted(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z - max`` (<= 0, so no large logit cancels in later sums) and ``sum exp(z - max)`` [.., 1]."""
    zs = z - z.amax(-1, keepdim=True)
    return zs, torch.exp(zs).sum(-1, keepdim=True)


def _kl(zs: torch.Tensor, log_s: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(z)) = sum p log p - sum p (zs - log_s), from shifted logits."""
    return neg_entropy + log_s.squeeze(-1) - (zs * p).sum(-1)


def _kl_and_dz(z, p, neg_entropy, row_weight, scale: float, softcap: float, want_grad: bool):
    """KL [G, C] and (if ``want_grad``) ``row_weight * dKL/dz`` [G, C, V] in ``z``'s dtype.

    ``z``: raw unembedding output [G, C, V]; ``p``: teacher probs [C, V]; ``neg_entropy``:
    sum p log p [C]; ``scale``/``softcap``: what the model applies after the unembedding.
    """
    zf = z.float()
    if scale != 1.0:
        zf = zf * scale
    if softcap:
        t = torch.tanh(zf / softcap)
        zf = t * softcap
    zs, s = _shifted(zf)
    log_s = torch.log(s)
    kl = _kl(zs, log_s, p, neg_entropy)
    if not want_grad:
        return kl, None
    g = (torch.exp(zs - log_s) - p) * row_weight[:, None]  # exp recomputed: no [G, C, V] float32 buffer
    if softcap:
        g = g * (1 - t * t)
    if scale != 1.0:
        g = g * scale
    return kl, g.to(z.dtype)


def _row_stats(z: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor, t_ids: torch.Tensor):
    """Top-1 id and probability, entropy, KL(teacher || lens), target ranks and probabilities of
    float32 logits ``z`` [C, V]; ``t_ids`` [C, n] are the target tokens."""
    top_id = z.argmax(-1)
    zs, s = _shifted(z)
    log_s = torch.log(s)
    finite = torch.where(torch.isfinite(zs), zs, 0.0)  # a -inf logit has p = 0: keep 0 * -inf out of sums
    entropy = log_s.squeeze(-1) - (torch.exp(zs) * finite).sum(-1) / s.squeeze(-1)
    kl = _kl(finite, log_s, p, neg_entropy).clamp_min(0.0)  # KL >= 0; rounding can dip below
    zt = z.gather(1, t_ids)  # [C, n]
    ranks = (z[:, None, :] > zt[:, :, None]).sum(-1) + 1
    log_z = z.amax(-1, keepdim=True) + log_s  # log sum exp(z)
    return top_id, (1.0 / s).squeeze(-1), entropy, kl, ranks, torch.exp(zt - log_z)


def _finish_inline(z: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    if scale != 1.0:
        z = z * scale
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z


def _rescored_stats(z16, ids, exact, keep, p, neg_entropy, n_targets: int, groups, scale: float, softcap: float):
    """`_row_stats` of the row ``finish(z16)`` with the entries ``ids`` [C, S] replaced by ``exact`` (where
    ``keep``), by sums over the 16-bit row corrected at those entries (see `rescored_stats`). The first
    ``n_targets`` columns of ``ids`` are the targets (or more: the ranks and probabilities of the extra columns
    are dropped by the caller). The row maximum is the best exact entry (the caller
    redoes every row where a token outside ``ids`` could pass it). ``groups``: `TokenGroups`'s (or
    `_NoGroups`'s) ``(cols, cols_onehot, big_onehot, one-hot groups of ids)`` for the mass per group."""
    r = _finish_inline(z16.float(), scale, softcap)
    r_s = _finish_inline(z16.gather(1, ids).float(), scale, softcap)
    w = keep.float()
    best = torch.where(keep, exact, torch.full_like(exact, float("-inf")))
    m, arg = best.max(1, keepdim=True)
    zs = r - m
    fin = torch.where(torch.isfinite(zs), zs, 0.0)  # a -inf logit has p = 0: keep 0 * -inf out of sums
    e = torch.exp(zs)
    rs, es = r_s - m, exact - m
    fin_rs = torch.where(torch.isfinite(rs), rs, 0.0)
    s = e.sum(-1) + (w * (torch.exp(es) - torch.exp(rs))).sum(-1)
    sez = (e * fin).sum(-1) + (w * (torch.exp(es) * es - torch.exp(rs) * fin_rs)).sum(-1)
    p_s = p.gather(1, ids)
    spz = (p * fin).sum(-1) + (w * p_s * (es - fin_rs)).sum(-1)
    log_s = torch.log(s)
    entropy = log_s - sez / s
    kl = (neg_entropy + log_s - spz).clamp_min(0.0)  # KL >= 0; rounding can dip below
    top_id = ids.gather(1, arg).squeeze(1)
    zt = exact[:, :n_targets]  # [C, n]
    above = (r[:, None, :] > zt[:, :, None]).sum(-1)
    above = above - (w[:, None, :] * (r_s[:, None, :] > zt[:, :, None])).sum(-1).long()
    above = above + (w[:, None, :] * (exact[:, None, :] > zt[:, :, None])).sum(-1).long()
    probs = torch.exp(zt - m) / s[:, None]
    # the mass per group: the tokens outside the largest group, gathered; that group's sum is the rest
    cols, cols_onehot, big_onehot, g = groups
    e_cols = torch.exp(_finish_inline(z16[:, cols].float(), scale, softcap) - m)  # [C, K]
    rest = e.sum(-1) - e_cols.sum(-1)
    fix = ((w * (torch.exp(es) - torch.exp(rs)))[:, :, None] * g).sum(1)  # the re-scored tokens, [C, G]
    mass = (e_cols @ cols_onehot + rest[:, None] * big_onehot + fix) / s[:, None]
    return top_id, 1.0 / s, entropy, kl, above + 1, probs, mass


class maybe_compiled:
    """``fn`` compiled with ``torch.compile`` on first use if possible, else (no C++ compiler,
    unsupported platform, ``LENSES_COMPILE=0``) the same function run eagerly, for good.

    One graph serves every call (a compile costs ~10 s on a fresh machine): shapes are dynamic and not
    duck-typed (torch would otherwise give two sizes that happen to be equal on the first call, a 5-row chunk
    and 5 token groups, one symbol, and compile again when they differ), and tensors are passed detached
    (whether an argument is a view of another tensor would otherwise choose the graph)."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None
        self.lock = threading.Lock()  # one compile at a time (`warm_up_in_background`)

    def __call__(self, *args):
        with self.lock:
            return self._call(*args)

    def _call(self, *args):
        if self.compiled is None:
            self.compiled = self.fn
            if os.environ.get("LENSES_COMPILE", "1") != "0":
                self.compiled = torch.compile(self.fn, dynamic=True)
        if self.compiled is not self.fn:
            try:
                with fx_config.patch(use_duck_shape=False):
                    return self.compiled(*_detached(args))
            except Exception as e:
                warnings.warn(f"torch.compile unavailable ({type(e).__name__}); using the slower eager kernel")
                self.compiled = self.fn
        return self.fn(*args)


def _detached(args):
    """``args`` with every tensor (in tuples too) detached: not a view, whatever it was (see `maybe_compiled`)."""
    if isinstance(args, tuple):
        return tuple(_detached(a) for a in args)
    return args.detach() if isinstance(args, torch.Tensor) else args


KERNELS = {"kl": maybe_compiled(_kl_and_dz), "stats": maybe_compiled(_row_stats),
           "rescored": maybe_compiled(_rescored_stats), "block_max": maybe_compiled(_block_max),
           "gather_dot": maybe_compiled(_gather_dot)}


class _StandIn:
    """What `rescored_stats` and `Teacher` read of a model, for `warm_up`: an unembedding of random rows (16
    wide) in the model's dtype, no final norm, no logit scale or soft-cap."""

    logit_scale, softcap = 1.0, None

    def __init__(self, vocab_size: int, device, dtype: torch.dtype):
        self.unembed = torch.nn.Linear(16, vocab_size, bias=False, device=device, dtype=dtype)

    def final_norm(self, h):
        return h

    def unembed_weight(self, dtype):
        return self.unembed.weight.detach().to(dtype)

    def unembed_plain(self):
        return self.unembed.weight.detach()


WARM_VOCAB = 33_000  # `warm_up`'s vocabulary: wide enough for `top_ids`'s blocks (any size compiles the same graphs)


def warm_up(dtype: torch.dtype, device="cpu", model_dtype: torch.dtype = torch.float32) -> None:
    """Compile the kernels a trace calls when it decodes in ``dtype`` on ``device`` a model whose weights are
    ``model_dtype`` (`row_stats`'s, and for a 16-bit ``dtype`` `rescored_stats`', `top_ids`'s and `_exact`'s), on
    three random rows through the same functions tracing calls, so that the same graphs are made: tracing then
    compiles nothing (tests/test_trace.py counts the graphs)."""
    with torch.no_grad():
        ad = _StandIn(WARM_VOCAB, device, model_dtype)
        x = torch.randn(3, 16, device=device)
        teacher = Teacher(ad, x, torch.float32, keep_logits=True)  # type: ignore[arg-type]
        t_ids = torch.zeros(3, 1, dtype=torch.long, device=device)
        row_stats(teacher.logits, teacher.p, teacher.neg_entropy, t_ids)
        if dtype in (torch.bfloat16, torch.float16):
            # 1 token in 50 outside group 0 (as the frequency view's ~1,000: inductor lays out sums of 4,097+ apart)
            groups = TokenGroups((torch.arange(WARM_VOCAB, device=device) % 50 == 0) * 7, 8)
            rescored_stats(ad, x, dtype, teacher.p, teacher.neg_entropy, t_ids, groups)  # type: ignore[arg-type]


def warm_up_in_background(dtype: torch.dtype, device="cpu", model_dtype: torch.dtype = torch.float32
                          ) -> threading.Thread | None:
    """`warm_up` in a background thread, started before the model loads (a first run compiles for ~20 s, mostly on one
    core, while loading leaves the other idle); a kernel called while it runs waits for it (`maybe_compiled`'s
    lock) rather than compiling twice. None where kernels are not compiled (``LENSES_COMPILE=0``)."""
    if os.environ.get("LENSES_COMPILE", "1") == "0":
        return None

    def run():
        try:
            warm_up(dtype, device, model_dtype)
        except Exception:  # only a head start: whatever failed here fails, with its message, where tracing calls it
            pass

    return lifecycle.start_background(run, "lenses-warm-up")  # joined before the process ends


def kl_rows(adapter: "ModelAdapter", h: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor,
            dtype: torch.dtype = torch.float32):
    """KL(p || q) [G, C] and the lens top-1 ids [G, C] for lens outputs ``h`` [G, C, d] (states the
    final norm reads) vs teacher rows ``p``, ``neg_entropy`` (see `Teacher`). (Scale and soft-cap are
    monotone, so the raw argmax is the top-1.)"""
    with torch.no_grad():
        z = unembed(adapter, adapter.final_norm(h), dtype)
        kl, _ = KERNELS["kl"](z, p, neg_entropy, None, adapter.logit_scale, adapter.softcap or 0.0, False)
        return kl, z.argmax(-1)


def kl_and_grad(adapter: "ModelAdapter", u: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor,
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


def kl_backward(adapter: "ModelAdapter", h: torch.Tensor, h_last: torch.Tensor, pos_weight: torch.Tensor | None = None,
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
    """`_row_stats` through the compiled kernel (see there)."""
    if z.shape[0] == 1:  # one row: twice (see `rescored_stats`)
        return tuple(s[:1] for s in row_stats(*map(_twice, (z, p, neg_entropy, t_ids))))
    n_t = t_ids.shape[1]
    out = KERNELS["stats"](z, p, neg_entropy, _two_or_more(t_ids))
    return (*out[:4], out[4][:, :n_t], out[5][:, :n_t])


# --------------------------------------------------------------------------- policies


def default_chunk_rows(adapter: "ModelAdapter", dtype: torch.dtype) -> int:
    """Rows per vocabulary chunk, from a byte budget for the ``[rows x V]`` logits.

    On a CPU with 16-bit matmuls, ~24 MB keeps the logits in the last-level cache between the
    matmul and the element-wise pass (240 rows for SmolLM2: 25% faster than 2,048 rows, measured);
    float32 and GPUs prefer bigger matmuls (2,048 rows of float32 for SmolLM2, ~400 MB).
    """
    small = adapter.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    budget = 24 * 2**20 if small else 400 * 2**20
    return max(1, budget // (adapter.vocab_size * torch.finfo(dtype).bits // 8))


def _time_matmul(dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(512, 576, device=device).to(dtype)
    b = torch.randn(576, 16384, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def compute_dtype(requested: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """Resolve ``auto``/a name/a dtype to the dtype of the vocabulary matmuls on ``device``.

    Some CPUs run bfloat16 matmuls ~2-4x faster than float32 (AVX512-BF16/AMX), others several
    times slower (AVX2: emulated). ``auto`` times both once per machine and caches the answer in
    the lenses cache; on CUDA it is bfloat16 where supported.
    """
    if isinstance(requested, torch.dtype):
        return requested
    if requested != "auto":
        if requested not in DTYPES:
            raise LensesError(f"unknown compute dtype {requested!r}; use auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu":
        return torch.float32
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "AVX512":
        return torch.float32  # no AVX-512 (an AVX2-only CPU): bfloat16 matmuls are emulated; timing one costs ~30 s
    key = f"{platform.processor() or platform.machine()}|{torch.__version__}|{torch.get_num_threads()}"
    file = cache_dir() / "compute_dtype.json"
    try:
        cached = json.loads(file.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict) or cached.get(key) not in DTYPES:
        cached = cached if isinstance(cached, dict) else {}
        t32 = _time_matmul(torch.float32, device)
        t16 = _time_matmul(torch.bfloat16, device)
        cached[key] = "bfloat16" if t16 < 0.8 * t32 else "float32"
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(cached, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
    return DTYPES[cached[key]]
