"""Tracing: what each lens predicts at every layer, for chosen positions of many texts.

`trace` runs the model once per text, keeps the hidden states of the positions asked for, and
decodes them layer by layer, chunk of rows by chunk of rows: memory is O(chunk x vocab) for the
logits plus O(chunk x layers x d) for the buffered hidden states, never layers x tokens x vocab.
It returns one tidy row per (lens, item, position, layer).

The per-position depth statistics (onset at k, settled layer, flips) are plain functions of
those rows, as Gupta et al. 2025 (arXiv 2510.18871) define them:

- rank of a target = 1 + number of tokens with strictly higher probability;
- onset at k = first layer where the target's rank <= k (k = 1: "first correct");
- settled layer = first layer from which the target stays rank 1 at every deeper layer;
- flipped = the layer's top-1 differs from the final (layer L) top-1.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import door, lifecycle, vocab
from .errors import LensesError
from .models import ModelAdapter, repeat_cache

ONSET_KS = (1, 10, 100, 1000, 10000)  # the paper's log grid for onset-vs-k curves


@dataclass
class TraceItem:
    """One text to trace: its token ids, which positions to keep, and target tokens per position.

    ``targets[name][j]`` is the target token id at ``positions[j]`` (e.g. the true next token,
    or an answer token); ranks and probabilities of every target are reported at every layer.
    """

    ids: Sequence[int]
    positions: Sequence[int]
    targets: dict[str, Sequence[int]] = field(default_factory=dict)


def _target_ids(targets: dict[str, torch.Tensor], rows: int, device) -> torch.Tensor:
    """The target ids as one tensor [rows, number of targets] (in ``targets``' order)."""
    if not targets:
        return torch.zeros(rows, 0, dtype=torch.long, device=device)
    return torch.stack(list(targets.values()), 1)


def _named(stats: tuple, targets: dict[str, torch.Tensor]) -> dict:
    """`vocab.row_stats`'s tuple (with the group mass last, or None) as named columns."""
    top_id, top_p, entropy, kl, ranks, probs, mass = stats
    out = {"top1_id": top_id, "top1_prob": top_p, "entropy": entropy, "kl": kl}
    for j, name in enumerate(targets):
        out[f"rank_{name}"] = ranks[:, j]
        out[f"prob_{name}"] = probs[:, j]
    if mass is not None:
        out["mass"] = mass
    return out


def _stats(z: torch.Tensor, p_final: torch.Tensor, neg_h_final: torch.Tensor, targets: dict[str, torch.Tensor],
           groups: "vocab.TokenGroups | None", top_k: int = 1) -> dict:
    """Per-row statistics of one layer's logits ``z`` [C, V] (float32) as named columns."""
    t_ids = _target_ids(targets, z.shape[0], z.device)
    stats = vocab.row_stats(z, p_final, neg_h_final, t_ids)
    out = _named((*stats, None if groups is None else groups.mass(z, stats[1])), targets)
    if top_k > 1:  # p_r = p_1 * exp(z_r - z_1): the softmax's normaliser is already in p_1
        values, ids = z.topk(top_k, dim=-1)
        out["top1_id"] = ids[:, 0]  # the same order as the rest of the row, ties included
        for r in range(1, top_k):
            out[f"top{r + 1}_id"] = ids[:, r]
            out[f"top{r + 1}_prob"] = out["top1_prob"] * torch.exp(values[:, r] - values[:, 0])
    return out


def _absent(z_rows: int, target_names, top_k: int, n_groups: int, device) -> dict:
    """The statistics of a layer a lens does not read: token id -1, NaN everywhere else."""
    nan = torch.full((z_rows,), float("nan"), dtype=torch.float64, device=device)
    none = torch.full((z_rows,), -1, dtype=torch.long, device=device)
    out = {"top1_id": none, "top1_prob": nan, "entropy": nan, "kl": nan}
    for r in range(2, top_k + 1):
        out[f"top{r}_id"], out[f"top{r}_prob"] = none, nan
    for name in target_names:
        out[f"rank_{name}"], out[f"prob_{name}"] = nan, nan
    if n_groups:
        out["mass"] = torch.full((z_rows, n_groups), float("nan"), dtype=torch.float64, device=device)
    return out


def _rows(stats: dict, meta: np.ndarray, lens_name: str, layer: int, targets: dict, group_names) -> dict:
    """One layer of one lens for a chunk of positions: the tidy rows' columns (name -> array)."""
    n = len(meta)
    cols = {"lens": np.full(n, lens_name, dtype=object), "item": meta[:, 0], "position": meta[:, 1],
            "layer": np.full(n, layer, dtype=np.int64)}
    for name, t in targets.items():
        cols[f"target_{name}"] = t.cpu().numpy()
    for key, v in stats.items():
        if key == "mass":
            for g, gname in enumerate(group_names):
                cols[f"mass_{gname}"] = v[:, g].cpu().numpy()
        else:
            cols[key] = v.cpu().numpy()
    return cols


def _table(parts: list[dict]) -> pd.DataFrame:
    """The rows of ``parts`` (`_rows`'s columns, all with the same names) as one table: columns joined as
    arrays, one DataFrame at the end (a DataFrame per lens and layer cost ~1 ms each, seconds per view)."""
    names = list(parts[0])
    odd = [sorted(p) for p in parts if set(p) != set(names)]
    if odd:
        raise AssertionError(f"trace rows with different columns: {sorted(names)} and {odd[0]}")
    return pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in names})


def decode_chunk(adapter, lenses: dict, h: torch.Tensor, meta: np.ndarray, targets: dict, groups, group_names,
                  dtype, top_k: int, redone: list[int]) -> pd.DataFrame:
    """Every lens at every layer for one chunk of positions ``h`` [L+1, C, d]: tidy rows. A 16-bit ``dtype``
    decodes through `vocab.rescored_stats` (top-1 and targets exact; ``redone`` counts rows decoded whole)."""
    L = adapter.num_layers
    frames = []
    half = dtype in (torch.bfloat16, torch.float16)
    t_ids = _target_ids(targets, h.shape[1], h.device)
    with torch.no_grad():
        teacher = vocab.Teacher(adapter, h[L], torch.float32 if half else dtype, keep_logits=True)  # exact
        final = None  # layer L's statistics: the same for every lens (`Lens.state` is h itself there)
        buf = None
        for lens_name, lens in lenses.items():
            for layer in range(L + 1):
                if not lens.has_layer(layer):
                    st = _absent(h.shape[1], list(targets), top_k, len(group_names), h.device)
                elif half and layer < L and top_k == 1:  # the statistics without making float32 logits
                    stats, n = vocab.rescored_stats(adapter, lens.state(h[layer], layer), dtype, teacher.p,
                                                    teacher.neg_entropy, t_ids, groups)
                    st, redone[0] = _named(stats, targets), redone[0] + n
                elif layer == L and final is not None:  # every lens reads the model's own output there
                    st = final
                else:
                    if layer == L:  # the model's own output (`Lens.state` is h there), decoded for the teacher
                        z = teacher.logits
                    elif half:
                        z, n = vocab.decode_rescored(adapter, lens.state(h[layer], layer), dtype, t_ids)
                        redone[0] += n
                    else:  # into one buffer for the chunk (`vocab.unembed`)
                        z = vocab.decode(adapter, lens.state(h[layer], layer), dtype, out=buf)
                        buf = z if buf is None and z.dtype == torch.float32 else buf
                    st = _stats(z, teacher.p, teacher.neg_entropy, targets, groups, top_k)
                    if layer == L:
                        final = st
                frames.append(_rows(st, meta, lens_name, layer, targets, group_names))
    return _table(frames)


def _checked_item(item: TraceItem, i: int, target_names, vocab_size: int | None) -> tuple[torch.Tensor, list[int]]:
    """The item's token ids and positions (negative ones from the end), checked against its length, and its
    targets (one in-vocabulary id per position, the same names as the other items'): `lenses.door`."""
    ids = door.token_ids(f"items[{i}].ids", item.ids, vocab_size, dims=1)
    pos = door.positions(f"items[{i}].positions", item.positions, len(ids))
    if not isinstance(item.targets, dict) or set(item.targets) != set(target_names):
        raise door.ArgumentError(f"items[{i}] has targets {sorted(item.targets)}, others have {target_names}; "
                                 "give every item the same target names.")
    for name, target in item.targets.items():
        if len(door.token_ids(f"items[{i}].targets[{name!r}]", target, vocab_size, dims=1)) != len(pos):
            raise door.ArgumentError(f"items[{i}].targets[{name!r}] has {len(target)} ids for {len(pos)} positions; "
                                     "give one target id per position.")
    return ids, pos


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


def _prepared(items: list[TraceItem], target_names, vocab_size: int | None = None
              ) -> list[tuple[int, torch.Tensor, list[int]]]:
    """``(index, token ids, positions)`` of each item with positions, checked; the ids end at the last
    position asked for (a causal model's states there do not depend on later tokens)."""
    out = []
    for i, it in enumerate(items):
        ids, pos = _checked_item(it, i, target_names, vocab_size)
        if pos:
            out.append((i, ids[: max(pos) + 1], pos))
    return out


def _hidden_of_batch(adapter, batch: list[tuple[int, torch.Tensor, list]],
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


def _batches(todo: list, batch_size: int, device: torch.device, skip: int = 0):
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
        got = _hidden_of_batch(adapter, [todo[0]], prefix)[0][1]
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


def _check_arguments(adapter, lenses, items, chunk, dtype, top_k, batch_size) -> tuple[list, torch.dtype]:
    """`trace`'s door (`lenses.door`): one line naming the argument, before any kernel runs; returns the items
    as a list (each one's ids and positions are checked in `_checked_item`) and the dtype."""
    try:
        if isinstance(items, (str, bytes, TraceItem)):
            raise TypeError
        items = list(items)
    except TypeError:
        raise door.fail("items", items, "an iterable of TraceItem") from None
    for i, item in enumerate(items):
        if not isinstance(item, TraceItem):
            raise door.fail(f"items[{i}]", item, "a TraceItem(ids, positions, targets)")
    if not isinstance(adapter, ModelAdapter):
        raise door.fail("adapter", adapter, "a ModelAdapter (lenses.ModelAdapter.from_model(model))")
    if not isinstance(lenses, dict) or not all(isinstance(k, str) and callable(getattr(v, "state", None))
                                               for k, v in lenses.items()):
        raise door.fail("lenses", lenses, "a dict of name -> Lens")
    door.integer("chunk", chunk, 1)
    door.integer("top_k", top_k, 1, adapter.vocab_size)
    door.integer("batch_size", batch_size, 1)
    return items, door.dtype("dtype", dtype)


def trace(
    adapter: ModelAdapter,
    lenses: dict,
    items: Iterable[TraceItem],
    groups: torch.Tensor | None = None,
    group_names: Sequence[str] = (),
    chunk: int = 256,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    top_k: int = 1,
    batch_size: int = 1,
    share_prefix: bool = True,
) -> pd.DataFrame:
    """Trace ``items`` through every layer (0..L) of every lens in ``lenses`` (name -> lens).

    A layer a lens does not read (`Lens.has_layer`, e.g. the embeddings for a Jacobian lens) gets NaN
    statistics and token id -1. Columns: lens, item, position, layer, top1_id, top1_prob (and top<r>_id,
    top<r>_prob for r = 2..``top_k``), entropy, kl (to the final layer's distribution, nats), for each
    target ``t``: target_t, rank_t, prob_t; for each token group ``g`` (``groups``: group index per vocab
    id, -1 for none): mass_g, the probability mass the lens puts on that group. ``dtype`` is the
    unembedding matmul dtype: float32, or bfloat16/float16 re-scored (`vocab.decode_rescored`: top-1 ids,
    target logits and the few highest tokens in float32, the rest of each row at 16-bit precision; the
    final layer's distribution in float32); the table's ``attrs`` say how many rows were decoded whole.
    Hidden states of about ``chunk`` positions are buffered, then decoded chunk by chunk: never a
    [layers x tokens x vocab] tensor. ``batch_size`` texts of similar length share a forward pass (padded
    on the right: a causal model's real positions never see the pads); the table is the same as one text
    at a time. A model whose states padding would change (`padding_check`) runs one text at a time, with
    a warning saying why. With ``share_prefix``, a token prefix that every text starts with (16 tokens or
    more, before every position asked for: a few-shot header, a chat template's system turn) runs once and
    each batch continues from its KV cache (`shared_prefix`; the same states within float rounding).
    """
    from tqdm.auto import tqdm

    items, dtype = _check_arguments(adapter, lenses, items, chunk, dtype, top_k, batch_size)
    if groups is not None:
        groups = vocab.TokenGroups(groups.to(adapter.device), len(group_names))
    target_names = sorted({n for it in items for n in it.targets})
    frames: list[pd.DataFrame] = []
    buf_h, buf_meta, buf_t = [], [], {n: [] for n in target_names}
    redone = [0]  # rows a 16-bit decode redid in float32

    def flush(last: bool = False):
        """Decode the buffered positions in chunks of ``chunk``; until the ``last`` call a partial chunk stays
        in the buffer (small matmuls waste the vocabulary work's best shape)."""
        if not buf_h:
            return
        h_all, meta = torch.cat(buf_h, dim=1), np.concatenate(buf_meta)
        tg_all = {n: torch.cat(v) for n, v in buf_t.items()}
        buf_h.clear(), buf_meta.clear(), [v.clear() for v in buf_t.values()]
        done = h_all.shape[1] if last else h_all.shape[1] // chunk * chunk
        if done < h_all.shape[1]:
            buf_h.append(h_all[:, done:].clone()), buf_meta.append(meta[done:])
            for n, v in tg_all.items():
                buf_t[n].append(v[done:])
        for s in range(0, done, chunk):
            tg = {n: v[s : s + chunk].to(adapter.device) for n, v in tg_all.items()}
            frames.append(decode_chunk(adapter, lenses, h_all[:, s : s + chunk], meta[s : s + chunk], tg, groups,
                                        group_names, dtype, top_k, redone))

    todo = _prepared(items, target_names, adapter.vocab_size)
    if batch_size > 1 and len(todo) > 1:
        reason = padding_check(adapter, [ids for _, ids, _ in todo])
        if reason:
            warnings.warn(f"tracing one text at a time: {reason}.", stacklevel=2)
            batch_size = 1
    if batch_size > 1:  # longest first: a batch holds texts of similar length (little padding); rows are sorted
        todo.sort(key=lambda t: -len(t[1]))  # by item at the end
    prefix = shared_prefix(adapter, todo) if share_prefix else None
    bar = tqdm(total=len(todo), desc="tracing", unit="text", disable=not progress)
    for batch in _batches(todo, batch_size, adapter.device, prefix.length if prefix else 0):
        lifecycle.check_stop()  # a signal swallowed on its way (e.g. inside a __del__) still stops here
        for i, h, pos in _hidden_of_batch(adapter, batch, prefix):
            buf_h.append(h)
            buf_meta.append(np.stack([np.full(len(pos), i), np.asarray(pos)], axis=1))
            for n in target_names:
                buf_t[n].append(torch.as_tensor(list(items[i].targets[n]), dtype=torch.long))
            if sum(x.shape[1] for x in buf_h) >= chunk:
                flush()
        bar.update(len(batch))
    bar.close()
    flush(last=True)
    if not frames:
        return pd.DataFrame(columns=["lens", "item", "position", "layer", "top1_id", "top1_prob", "entropy", "kl"])
    df = pd.concat(frames, ignore_index=True)
    df = df.sort_values(["lens", "item", "position", "layer"], kind="stable").reset_index(drop=True)
    df.attrs.update(decode_dtype=str(dtype).removeprefix("torch."), rows_decoded_whole=redone[0])
    return df


# ---- depth statistics over a trajectory (arrays [..., layers]) -------------------------------


def onset_layer(ranks: np.ndarray, k: int) -> np.ndarray:
    """First layer where rank <= k, per trajectory (NaN if never)."""
    hit = np.asarray(ranks) <= k
    first = hit.argmax(-1).astype(float)
    first[~hit.any(-1)] = np.nan
    return first


def settled_layer(is_top: np.ndarray) -> np.ndarray:
    """First layer from which ``is_top`` holds at every deeper layer (NaN if not at the last)."""
    is_top = np.asarray(is_top, dtype=bool)
    n = is_top.shape[-1]
    suffix_all = np.flip(np.cumprod(np.flip(is_top, -1), -1), -1).astype(bool)  # all True from l on
    settled = (n - suffix_all.sum(-1)).astype(float)
    settled[~is_top[..., -1]] = np.nan
    return settled


def flipped(top1: np.ndarray) -> np.ndarray:
    """Whether each layer's top-1 differs from the final layer's."""
    top1 = np.asarray(top1)
    return top1 != top1[..., -1:]


def trajectories(df: pd.DataFrame, column: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Reshape one column of a trace into ``[trajectories, layers]`` plus their (lens, item, position) keys."""
    df = df.sort_values(["lens", "item", "position", "layer"], kind="stable")
    if df.empty:
        return df[["lens", "item", "position"]].reset_index(drop=True), np.zeros((0, 1), dtype=df[column].dtype)
    n_layers = int(df["layer"].max()) + 1
    keys = df[["lens", "item", "position"]].iloc[::n_layers].reset_index(drop=True)
    values = df[column].to_numpy().reshape(-1, n_layers)
    return keys, values


def _check_table(df, column: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise door.fail("df", df, "a table from trace() (a pandas DataFrame)")
    missing = [c for c in ("lens", "item", "position", "layer", column) if c not in df.columns]
    if missing:
        raise door.ArgumentError(f"the table has no column {missing[0]!r}: pass a table from trace() with that "
                                 "target.")


def depth_summary(df: pd.DataFrame, target: str, ks: Sequence[int] = ONSET_KS) -> pd.DataFrame:
    """One row per (lens, item, position): first_correct, settled and onset_k<k> layers for ``target``."""
    _check_table(df, f"rank_{target}")
    keys, ranks = trajectories(df, f"rank_{target}")
    out = keys.copy()
    out["num_layers"] = ranks.shape[1] - 1
    out["final_rank"] = ranks[:, -1]
    out["first_correct"] = onset_layer(ranks, 1)
    out["settled"] = settled_layer(ranks == 1)
    for k in ks:
        out[f"onset_k{k}"] = onset_layer(ranks, k)
    return out


def onset_curve(summary: pd.DataFrame, by: Sequence[str] = ("lens",), ks: Sequence[int] = ONSET_KS) -> pd.DataFrame:
    """Mean onset layer against k (tidy: *by, k, mean_layer, n), from `depth_summary` rows."""
    rows = []
    for key, g in summary.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for k in ks:
            v = g[f"onset_k{k}"].dropna()
            rows.append({**dict(zip(by, key)), "k": k, "mean_layer": v.mean() if len(v) else np.nan, "n": len(v)})
    return pd.DataFrame(rows)
