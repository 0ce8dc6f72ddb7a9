"""Texts into forward passes: batches of similar length (padded on the right), a shared prefix run once
and continued from its KV cache, and the check that padding leaves a model's states alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lenses.base.errors import LensesError
from lenses.model.adapter import repeat_cache


def _finite(h: torch.Tensor, i: int) -> torch.Tensor:
    bad = (~torch.isfinite(h)).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        raise LensesError(
            f"hidden states of item {i} contain NaN/inf from layer {bad[0]} on (layers {bad[:5]}...): the "
            "model overflows in this dtype (e.g. float16). Load it in float32 or bfloat16 (--model-dtype)."
        )
    return h


def _padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """Token ids [B, T], padded on the right (token 0). A causal model never lets a position see later ones,
    so the pads change no real position's states and need no attention mask: without one the model keeps its
    fast causal attention (`padding_check` proves this holds for the model at hand)."""
    ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    return ids


def hidden_of_batch(adapter, batch: list[tuple[int, torch.Tensor, list]],
                     prefix: "SharedPrefix | None" = None) -> list[tuple[int, torch.Tensor, list]]:
    """``(item index, hidden [L+1, P, d] at its positions, positions)`` of each prepared item, with one
    forward pass for the whole batch (after the shared ``prefix``, if any, from its cache)."""
    skip = prefix.length if prefix else 0
    rows = [ids[skip:] for _, ids, _ in batch]
    extra = prefix.cache(len(batch)) if prefix else {}
    h_all = adapter.hidden_states(rows[0][None] if len(batch) == 1 else _padded(rows), **extra)
    return [(i, _finite(h_all[:, b, [p - skip for p in pos]], i), pos) for b, (i, _, pos) in enumerate(batch)]


PADDING = 0.1  # a batch stops growing where pads would pass this share of its tokens ...
BUSY_TOKENS = {"cpu": 128, "cuda": 8192}  # ... once it has enough real tokens to keep the device busy


def batches(todo: list, batch_size: int, device: torch.device, skip: int = 0):
    """Consecutive batches of at most ``batch_size`` prepared texts (sorted longest first): a batch also closes
    where the next text would make pads more than `PADDING` of its tokens, once it holds `BUSY_TOKENS` real
    tokens (a CPU is near its matmul limit with one text of ~100 tokens and pays for every pad; a GPU wants
    big batches). ``skip``: the shared prefix's length, which runs from its cache. The batches never change a
    real position's states, only how many pads are computed."""
    busy = BUSY_TOKENS.get(device.type, BUSY_TOKENS["cuda"])
    batch, real = [], 0
    for t in todo:
        n = len(t[1]) - skip
        if batch and (len(batch) == batch_size or
                      (real >= busy and (len(batch) + 1) * (len(batch[0][1]) - skip) > (1 + PADDING) * (real + n))):
            yield batch
            batch, real = [], 0
        batch.append(t)
        real += n
    if batch:
        yield batch


MIN_PREFIX = 16  # shorter shared prefixes are recomputed: a cache copy per batch would cost about as much


@dataclass
class SharedPrefix:
    """The token prefix every text of a trace starts with (a few-shot header, a chat template's system turn),
    run once; each batch continues from a copy of its KV cache."""

    length: int
    _cache: dict

    def cache(self, batch: int) -> dict:
        """A copy of the prefix's cache for a batch of ``batch`` texts."""
        import copy

        return repeat_cache(copy.deepcopy(self._cache), batch)


def shared_prefix(adapter, todo: list[tuple[int, torch.Tensor, list[int]]]) -> SharedPrefix | None:
    """The longest token prefix of every prepared text that lies before every position asked for (at least
    `MIN_PREFIX` tokens and one token short of the shortest text), with its cache; None if there is none
    or the model's cache cannot be reused (`ModelAdapter.prefix_cache`)."""
    if len(todo) < 2:
        return None
    first = todo[0][1]
    n = min(min(len(ids) for _, ids, _ in todo) - 1, min(min(pos) for _, _, pos in todo))
    for _, ids, _ in todo[1:]:
        same = (ids[:n] == first[:n]).long()
        n = int(same.cumprod(0).sum())
        if n < MIN_PREFIX:
            return None
    if n < MIN_PREFIX:
        return None
    cache = adapter.prefix_cache(first[None, :n])
    if cache is None:
        return None
    prefix = SharedPrefix(n, cache)
    try:  # proved on the first text: from the cache, its states are those of a full pass
        i, ids, pos = todo[0]
        got = hidden_of_batch(adapter, [todo[0]], prefix)[0][1]
        want = adapter.hidden_states(ids[None])[:, 0, pos]
        err = float(((got - want).abs().amax() / want.abs().amax().clamp_min(1e-6)).float())
    except (AttributeError, TypeError, ValueError, NotImplementedError, RuntimeError, KeyError, IndexError):
        return None
    return prefix if err <= 1e-3 else None


def padding_check(adapter, rows: list[torch.Tensor]) -> str | None:
    """Why texts of different lengths (token-id rows) cannot share a forward pass for this model, or None if
    they can: the shortest text alone must give the states it gives padded in a batch with the longest."""
    cached = getattr(adapter, "_padding_reason", False)
    if cached is not False:
        return cached
    short, long_ = min(rows, key=len), max(rows, key=len)
    reason = None
    if len(short) < len(long_):
        try:
            both = adapter.hidden_states(_padded([long_, short]))[:, 1, : len(short)]
            alone = adapter.hidden_states(short[None])[:, 0]
            scale = alone.abs().amax().clamp_min(1e-6)
            err = float(((both - alone).abs().amax() / scale).float())
            if not err <= 1e-3:  # float rounding differs by ~1e-6; a padding effect by far more
                reason = f"padding changes the states of real positions (relative difference {err:.1e})"
        except (TypeError, ValueError, RuntimeError) as e:  # a model that refuses a mask or a padded batch
            reason = f"the model refuses a padded batch ({type(e).__name__}: {str(e)[:120]})"
        adapter._padding_reason = reason
    return reason


