"""The Jacobian-lens estimator (Gurnee et al. 2026) on one prompt and on a list of prompts.

For one prompt of ``T`` tokens the valid positions are ``V = {skip_first, ..., T-2}`` and

    J_p[k] = mean over sources t in V of  sum over targets t' in V of  d hidden[L][t'] / d hidden[k][t]

(causality makes every term with ``t' < t`` zero). One reverse pass per output dimension gives row ``i`` of
``J_p[k]`` for every layer ``k`` at once (`prompt_jacobian`); the long job around it is `jlens_fit`.
"""

from __future__ import annotations

import warnings
import zlib

import torch

from lenses.base.errors import DataError, LensesError
from lenses.jobs import jlens_half, jlens_written
from lenses.jobs.jlens_half import Spread, half_backward
from lenses.kinds.jacobian import JacobianLens
from lenses.model.adapter import ModelAdapter
from lenses.model.intervene import edit_residual
from lenses.text import convention
from lenses.text.data import split_documents

SKIP_FIRST = 16  # the reference's attention-sink region


def prompt_jacobian(adapter: ModelAdapter, ids: torch.Tensor, layers: list[int], skip_first: int = SKIP_FIRST,
                    dim_batch: int = 8, prefix_cache: bool = True,
                    backward_dtype: torch.dtype | None = None, written: bool = True) -> torch.Tensor:
    """``J_p`` of one prompt (token ids [T]) for our layers ``layers`` (``hidden[k]``, k < L):
    ``[len(layers), d, d]``, rows = target dimensions, in float32 (float64 for a float64 model).

    With ``prefix_cache`` the first ``skip_first`` positions (never sources nor targets) run once
    without gradients and serve the rest as a key/value cache, so the backward passes skip them (the
    numbers are the same; models whose cache cannot be reused run in full). ``backward_dtype`` (bfloat16): the
    backward's matmuls in half precision (`lenses.jobs.jlens_half`), the sums still in float32. ``written`` False:
    autograd even where the backward can be written out (`row_blocks`)."""
    out = None
    for start, rows in row_blocks(adapter, ids, layers, skip_first, dim_batch, prefix_cache, backward_dtype,
                                  written):
        if out is None:
            out = torch.zeros(len(layers), adapter.d_model, adapter.d_model, dtype=rows.dtype)
        out[:, start : start + rows.shape[1]] = rows.cpu()
    return out


def row_blocks(adapter: ModelAdapter, ids: torch.Tensor, layers: list[int], skip_first: int = SKIP_FIRST,
               dim_batch: int = 8, prefix_cache: bool = True, backward_dtype: torch.dtype | None = None,
               written_ok: bool = True):
    """``J_p``'s rows ``dim_batch`` at a time: yields ``(start, rows)``, ``rows`` [len(layers), n, d] on the
    model's device (one backward pass each; `prompt_jacobian` assembles them). Llama- and Gemma-family blocks run
    the backward written out (`lenses.jobs.jlens_written`, unless ``written_ok`` is False); others run autograd
    on one graph of ``dim_batch`` copies of the prompt, the first ``skip_first`` positions a cache."""
    ids = torch.as_tensor(ids).flatten()
    T, d = ids.numel(), adapter.d_model
    if T - 1 <= skip_first:
        raise DataError(f"a prompt of {T} tokens has no valid position (needs more than {skip_first + 1} tokens).")
    seed = zlib.crc32(ids.cpu().numpy().tobytes())  # the weights' rounding, drawn per prompt (`half_backward`)
    written = _written(adapter, ids[: T - 1], min(layers), skip_first, backward_dtype, seed) if (
        prefix_cache and written_ok) else None
    if written is not None:
        n = T - 1 - skip_first
        cotangent = torch.zeros(dim_batch, n, d, dtype=written.acc, device=adapter.device)
        for start in range(0, d, dim_batch):
            m = min(dim_batch, d - start)
            cotangent.zero_()
            cotangent[torch.arange(m), :, start + torch.arange(m)] = 1
            yield start, written.backward(cotangent, layers)[:, :m]
        return
    x = ids[: T - 1][None].expand(dim_batch, -1)  # position T-1 is neither a source nor a target
    with half_backward(adapter, backward_dtype, seed):  # the graph records which dtype its backward multiplies in
        target, sources, offset = _graph(adapter, x, layers, skip_first if prefix_cache else 0)
    valid = torch.arange(skip_first - offset, T - 1 - offset, device=target.device)
    acc = jlens_half.sum_dtype(target.dtype)  # sums in float32 whatever the matmuls' dtype
    cotangent = torch.zeros_like(target)
    rows = torch.arange(dim_batch, device=target.device)
    for start in range(0, d, dim_batch):
        n = min(dim_batch, d - start)
        cotangent.zero_()
        cotangent[rows[:n, None], valid[None, :], start + rows[:n, None]] = 1
        grads = torch.autograd.grad(target, sources, cotangent, retain_graph=start + dim_batch < d)
        yield start, torch.stack([g[:n, valid].to(acc).mean(1) for g in grads])


def _written(adapter: ModelAdapter, ids: torch.Tensor, first: int, skip: int, dtype, seed: int):
    """The written-out backward at this prompt, or None (this model's blocks need autograd; said once)."""
    if jlens_written.unsupported(adapter) is not None:
        return None
    made = jlens_written.capture(adapter, ids, first, skip, dtype, torch.Generator().manual_seed(seed))
    if made is None:
        warnings.warn("the Jacobian-lens fit's written-out backward does not reproduce this model's blocks on a "
                      "prompt (a sliding window shorter than it, or another block form): autograd fits it instead "
                      "(the same numbers, slower).", stacklevel=3)
    return made


def _graph(adapter: ModelAdapter, x: torch.Tensor, layers: list[int], prefix: int):
    """Run ``x`` [B, T] recording ``hidden[L]`` and the sources (the earliest one a leaf requiring grad);
    the first ``prefix`` positions, when > 0, run first without gradients as a cache. Returns (target,
    sources, offset): the recorded tensors cover positions ``offset..T-1``."""
    L, first, captured = adapter.num_layers, min(layers), {}

    def capture(k):
        def fn(h):
            if k == first:
                h = h.detach().requires_grad_(True)
            captured[k] = h
            return h
        return fn

    edits = {k: capture(k) for k in sorted(set(layers) | {L})}
    cache = adapter.prefix_cache(x[:, :prefix]) if prefix > 0 else None
    if cache is not None:
        try:
            with edit_residual(adapter, edits):
                adapter.run_stream(x[:, prefix:], grad=True, **cache)
            return captured[L], [captured[k] for k in layers], prefix
        except (AttributeError, TypeError, ValueError, NotImplementedError, KeyError):
            captured.clear()  # this model's cache cannot be continued that way: run in full (same numbers)
    with edit_residual(adapter, edits):
        adapter.run_stream(x, grad=True)
    return captured[L], [captured[k] for k in layers], 0


def fit_prompts(adapter: ModelAdapter, prompts, layers: list[int] | None = None, skip_first: int = SKIP_FIRST,
                dim_batch: int = 8, progress: bool = False, backward_dtype: torch.dtype | None = None,
                spread: Spread | None = None, written: bool = True) -> JacobianLens:
    """The Jacobian lens of ``prompts`` (token-id sequences; too-short ones are skipped, not counted), for
    ``layers`` (default 1..L-1, the published layers). No files: see `fit` for the long job. ``spread``
    (`lenses.jobs.jlens_half.Spread`) also collects each prompt's J for its sampling error."""
    from tqdm.auto import tqdm

    layers = check_layers(adapter, layers)
    total, n = None, 0
    for ids in tqdm(list(prompts), desc="fitting J-lens", unit="prompt", disable=not progress):
        if len(ids) <= skip_first + 1:
            continue
        J = prompt_jacobian(adapter, torch.as_tensor(ids), layers, skip_first, dim_batch,
                            backward_dtype=backward_dtype, written=written)
        total = J.to(jlens_half.sum_dtype(J.dtype)) if total is None else total + J
        if spread is not None:
            spread.add(J)
        n += 1
    if total is None:
        raise DataError(f"every prompt has {skip_first + 1} tokens or fewer: none has a valid position.")
    return JacobianLens.from_matrices({k: total[j] / n for j, k in enumerate(layers)}, adapter.num_layers,
                                      {"n_prompts": n, "skip_first": skip_first}, model=adapter)


def check_layers(adapter: ModelAdapter, layers) -> list[int]:
    L = adapter.num_layers
    layers = list(range(1, L)) if layers is None else sorted(set(int(k) for k in layers))
    bad = [k for k in layers if not 0 <= k < L]
    if bad or not layers:
        raise LensesError(f"Jacobian-lens layers {bad or '[]'} are out of range: fit hidden states 0..{L - 1} "
                          f"(hidden[{L}] is the model's output, read without a transport).")
    return layers



def corpus_prompts(texts: list[str], tokenizer, n: int, seq_len: int = 128, min_chars: int = 600) -> list[torch.Tensor]:
    """Up to ``n`` prompts from the training side of the corpus's document split (the held-out side is
    never fitted on): documents of at least ``min_chars`` characters, each starting as the model reads it
    (the tokenizer's own prefix, e.g. BOS, where it adds one: `lenses.text.convention`), cut to ``seq_len``
    tokens. The reference used WikiText records of >= 600 characters, 128 tokens, BOS first; a tokenizer that
    adds no BOS (SmolLM2) gets none here, as in use (the first ``skip_first`` positions are never fitted)."""

    docs, streams, cut = split_documents(texts, tokenizer)
    prefix = list(convention.of(tokenizer).prefix)
    prompts = []
    for doc, stream in zip(docs[:cut], streams[:cut]):
        if len(doc) < min_chars:
            continue
        ids = prefix + stream.tolist()
        prompts.append(torch.tensor(ids[:seq_len], dtype=torch.long))
        if len(prompts) == n:
            break
    return prompts


def owned_rows(d: int, dim_batch: int, world: int, rank: int) -> torch.Tensor:
    """The output dimensions whose sums process ``rank`` holds when sharded: the row blocks of one backward
    pass (``dim_batch`` rows) are dealt out in turn, block ``b`` to process ``b % world``."""
    blocks = range(rank * dim_batch, d, world * dim_batch)
    return torch.tensor([r for b in blocks for r in range(b, min(d, b + dim_batch))], dtype=torch.long)


