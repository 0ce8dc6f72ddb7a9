"""The compiled element-wise kernels of the vocabulary engine, and the rules for compiling them.

Each kernel reads ``[rows x V]`` logits once, built on the same shifted soft-max helpers (logits minus
their row maximum, so large logits do not cancel): `_kl_and_dz` (training: KL and ``softmax(z) - p``),
`_row_stats` (tracing: top-1, entropy, KL, ranks and probabilities of target tokens), `_rescored_stats`
(the same of 16-bit logits corrected at re-scored tokens), `_block_max` and `_gather_dot` (helpers of the
re-scored decode). They are called through `KERNELS`, whose entries apply these rules, here and nowhere else:

1. One graph per kernel: shapes are dynamic and not duck-typed (torch would otherwise give two sizes that
   happen to be equal on the first call, a 5-row chunk and 5 token groups, one symbol, and compile again
   when they differ).
2. At least two rows: ``torch.compile`` specialises sizes 0 and 1, each a compile of its own (~10 s on a
   fresh machine), so a one-row call runs on its row twice and returns the first row of every output
   (`Kernel.__call__`, for the arguments a kernel declares as ``rows``). Applied compiled or not, so
   both paths compute on the same shapes.
3. At least two target columns: for the same reason the callers pad target ids to two columns
   (`kl.row_stats`) or pass a target count of at least two (`rescored.rescored_stats`), and drop the
   extra columns' results.
4. Tensors are passed detached: whether an argument is a view of another would otherwise choose the graph.
5. One compile at a time (a lock per kernel): a kernel called while `warmup.warm_up_in_background`
   compiles it waits rather than compiling twice.
6. Where the compiler itself fails (no C++ compiler, an unsupported platform: its own exception types,
   `COMPILER_ERRORS`), the kernel runs eagerly for good, with a warning. Any other exception is a bug in
   a kernel and surfaces as itself.
7. ``LENSES_COMPILE=0`` runs every kernel eagerly (the tests' configuration, tests/conftest.py).
"""

from __future__ import annotations

import os
import threading
import warnings

import torch
import torch._dynamo.exc as dynamo_exc
import torch.fx.experimental._config as fx_config


def _gather_dot(w: torch.Tensor, u: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[C, k]: the dot products of rows ``ids`` [C, k] of ``w`` [V, d] (in float32) with ``u`` [C, d] (float32).
    Compiled, the rows are read where they lie (a [C, k, d] copy and a batched matmul took 4x as long)."""
    rows = w[ids].float()
    if torch.compiler.is_compiling():
        return (rows * u[:, None, :]).sum(-1)
    return torch.bmm(rows, u[:, :, None]).squeeze(-1)



def _block_max(z: torch.Tensor, B: int) -> torch.Tensor:
    """[C, V // B + 1]: the maximum of each whole block of ``B`` columns of ``z`` [C, V] (V >= B), then of the
    last ``B`` columns as the bound of the last block (columns ``V // B * B`` on; empty when B divides V): they
    hold its columns and overlap the block before, so the bound can exceed its own maximum, which `top_ids`
    allows for. No branch on ``V % B``: one compiled graph for every vocabulary size."""
    nb = z.shape[1] // B
    full = z[:, : nb * B].reshape(z.shape[0], nb, B).amax(-1)
    return torch.cat([full, z[:, -B:].amax(-1, keepdim=True)], 1)



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


def _rescored_stats(z16, ids, exact, keep, p, neg_entropy, g, n_targets: int, cols, cols_onehot, big_onehot,
                    scale: float, softcap: float):
    """`_row_stats` of the row ``finish(z16)`` with the entries ``ids`` [C, S] replaced by ``exact`` (where
    ``keep``), by sums over the 16-bit row corrected at those entries (see `rescored_stats`). The first
    ``n_targets`` columns of ``ids`` are the targets (or more: the ranks and probabilities of the extra columns
    are dropped by the caller). The row maximum is the best exact entry (the caller
    redoes every row where a token outside ``ids`` could pass it). ``g``: the one-hot groups of ``ids``
    [C, S, n]; ``cols``, ``cols_onehot``, ``big_onehot``: `TokenGroups`'s (or `_NoGroups`'s), for the
    mass per group."""
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
    e_cols = torch.exp(_finish_inline(z16[:, cols].float(), scale, softcap) - m)  # [C, K]
    rest = e.sum(-1) - e_cols.sum(-1)
    fix = ((w * (torch.exp(es) - torch.exp(rs)))[:, :, None] * g).sum(1)  # the re-scored tokens, [C, G]
    mass = (e_cols @ cols_onehot + rest[:, None] * big_onehot + fix) / s[:, None]
    return top_id, 1.0 / s, entropy, kl, above + 1, probs, mass



COMPILER_ERRORS = (dynamo_exc.BackendCompilerFailed, dynamo_exc.InternalTorchDynamoError, dynamo_exc.Unsupported,
                   dynamo_exc.InvalidBackend)  # rule 6: the compiler's own failures


class Kernel:
    """``fn`` compiled with ``torch.compile`` on first use if possible, else the same function run eagerly, for
    good (rules 1, 4, 5, 6, 7). ``rows``: the positions of the arguments whose first dimension is the row
    dimension (rule 2); every tensor ``fn`` returns is indexed by row too."""

    def __init__(self, fn, rows: tuple[int, ...] = ()):
        self.fn, self.rows = fn, rows
        self.compiled = None
        self.lock = threading.Lock()  # rule 5

    def __call__(self, *args):
        one = bool(self.rows) and args[self.rows[0]].shape[0] == 1
        if one:  # rule 2: the row twice
            args = tuple(_twice(a) if i in self.rows else a for i, a in enumerate(args))
        with self.lock:
            out = self._call(*args)
        return _first_rows(out) if one else out

    def fresh(self) -> "Kernel":
        """The same kernel, not compiled yet (the tests count the graphs a first use compiles)."""
        return Kernel(self.fn, self.rows)

    def _call(self, *args):
        if self.compiled is None:
            self.compiled = self.fn
            if os.environ.get("LENSES_COMPILE", "1") != "0":  # rule 7
                try:
                    self.compiled = torch.compile(self.fn, dynamic=True)
                except RuntimeError as e:  # rule 6: a platform torch.compile does not support
                    warnings.warn(f"torch.compile unavailable ({e}); using the slower eager kernel")
        if self.compiled is not self.fn:
            try:
                with fx_config.patch(use_duck_shape=False):  # rule 1
                    return self.compiled(*_detached(args))  # rule 4
            except COMPILER_ERRORS as e:  # rule 6
                warnings.warn(f"torch.compile unavailable ({type(e).__name__}); using the slower eager kernel")
                self.compiled = self.fn
        return self.fn(*args)


def _twice(t: torch.Tensor) -> torch.Tensor:
    """A one-row tensor's row twice (rule 2)."""
    return t.expand(2, *t.shape[1:]).contiguous()


def _first_rows(out):
    if isinstance(out, tuple):
        return tuple(_first_rows(o) for o in out)
    return out[:1] if isinstance(out, torch.Tensor) else out


def _detached(args):
    """``args`` with every tensor (in tuples too) detached: not a view, whatever it was (rule 4)."""
    if isinstance(args, tuple):
        return tuple(_detached(a) for a in args)
    return args.detach() if isinstance(args, torch.Tensor) else args


KERNELS = {"kl": Kernel(_kl_and_dz), "stats": Kernel(_row_stats, rows=(0, 1, 2, 3)),
           "rescored": Kernel(_rescored_stats, rows=(0, 1, 2, 3, 4, 5, 6)), "block_max": Kernel(_block_max, rows=(0,)),
           "gather_dot": Kernel(_gather_dot, rows=(1, 2))}
