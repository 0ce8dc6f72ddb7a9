"""The re-scored decode: 16-bit vocabulary matmuls whose single-token readings are float32's.

`decode_rescored` makes logits with the vocabulary matmul in bfloat16/float16 and re-scores, in float32,
each row's highest tokens and its targets; a row whose top-1 the 16-bit error could change is decoded whole
in float32. `rescored_stats` computes `kl.row_stats` of those logits without making them (one compiled
pass over the 16-bit row, corrected at the re-scored tokens). `TokenGroups` adds the probability mass per
token group (the frequency view's buckets) to the same pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lenses.engine.decoding import decode, finish, top_ids, unembed
from lenses.engine.kernels import KERNELS
from lenses.engine.kl import row_stats
from lenses.engine.protocol import Readout

RESCORED = 32  # candidates per row re-scored in float32 by `decode_rescored`


def _exact(adapter: Readout, u: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits (scaled, soft-capped) of normalised states ``u`` [C, d] for the tokens ``ids`` [C, k]."""
    z = KERNELS["gather_dot"](adapter.unembed_plain(), u.float(), ids)
    if adapter.unembed.bias is not None:
        z = z + adapter.unembed.bias[ids].float()
    return finish(adapter, z)



def _rescore(adapter: Readout, x: torch.Tensor, dtype: torch.dtype, targets: torch.Tensor | None,
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




def decode_rescored(adapter: Readout, x: torch.Tensor, dtype: torch.dtype,
                    targets: torch.Tensor | None = None, candidates: int = RESCORED) -> tuple[torch.Tensor, int]:
    """Logits of states ``x`` [C, d] (before the final norm) with the vocabulary matmul in a 16-bit
    ``dtype``, made exact where the statistics read single tokens: the ``candidates`` highest tokens of
    each row and its ``targets`` [C, k] are re-scored in float32, and a row whose top-1 the 16-bit error
    could change (a token outside the candidates within the error bound of the best) is decoded whole in
    float32. So top-1 ids and target logits are float32's; every other logit carries the 16-bit matmul's
    error (~2^-8 relative). Returns ``(z, rows decoded whole)``. `rescored_stats` computes the statistics
    of these logits without making them."""
    z16, _, ids, exact, keep, redo = _rescore(adapter, x, dtype, targets, candidates)
    z = finish(adapter, z16.float())
    n_t = 0 if targets is None else targets.shape[1]
    z.scatter_(1, ids[:, n_t:], exact[:, n_t:])
    z.scatter_(1, ids[:, :n_t], exact[:, :n_t])  # after the candidates: a target's own value wins
    n = int(redo.sum())
    if n:
        z[redo] = decode(adapter, x[redo], torch.float32).to(z.dtype)
    return z, n



class _NoGroups:
    """`TokenGroups`'s kernel inputs when no groups are asked for, whose mass is dropped: 3 tokens in 2 groups
    of zeros, shaped as `TokenGroups`'s (no size 0 or 1: the compiled kernel keeps one graph, rule 2 of `kernels`)."""

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


def rescored_stats(adapter: Readout, x: torch.Tensor, dtype: torch.dtype, p: torch.Tensor,
                   neg_entropy: torch.Tensor, t_ids: torch.Tensor, groups: "TokenGroups | None" = None,
                   candidates: int = RESCORED) -> tuple[tuple, int]:
    """`row_stats` (plus the probability mass per token group of ``groups``) of the logits `decode_rescored`
    would return, without making them: one compiled pass over the 16-bit logits sums the whole row, and the
    few re-scored tokens correct the sums (``sum over the row of f(exact) = sum of f(16-bit) - f(16-bit) at
    the re-scored tokens + f(exact) there``). Equal to ``row_stats(decode_rescored(...))`` within float32
    rounding (tests/test_trace.py), without the ``[C, V]`` float32 copy and its passes. Returns ``(stats,
    rows decoded whole)``; stats are `row_stats`'s tuple with the mass [C, n groups] (or None) appended."""
    n_t = t_ids.shape[1]
    z16, _, ids, exact, keep, redo = _rescore(adapter, x, dtype, t_ids, candidates)
    g = groups if groups is not None else _NoGroups(ids.device)
    # n_targets of at least 2 (the candidates' extra columns dropped below): rule 3 of `kernels`
    out = list(KERNELS["rescored"](z16, ids, exact, keep, p, neg_entropy, g.of(ids), max(n_t, 2), g.cols,
                                   g.cols_onehot, g.big_onehot, adapter.logit_scale, adapter.softcap or 0.0))
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



def top1_ids(adapter: Readout, x: torch.Tensor, dtype: torch.dtype | None = None,
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

