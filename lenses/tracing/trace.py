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

import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from lenses import engine
from lenses.base import door, lifecycle
from lenses.model.adapter import ModelAdapter
from lenses.tracing import parallel, saved, states
from lenses.tracing.batching import batches, hidden_of_batch, padding_check, shared_prefix


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
    """`engine.row_stats`'s tuple (with the group mass last, or None) as named columns."""
    top_id, top_p, entropy, kl, ranks, probs, mass = stats
    out = {"top1_id": top_id, "top1_prob": top_p, "entropy": entropy, "kl": kl}
    for j, name in enumerate(targets):
        out[f"rank_{name}"] = ranks[:, j]
        out[f"prob_{name}"] = probs[:, j]
    if mass is not None:
        out["mass"] = mass
    return out


def _stats(z: torch.Tensor, p_final: torch.Tensor, neg_h_final: torch.Tensor, targets: dict[str, torch.Tensor],
           groups: "engine.TokenGroups | None", top_k: int = 1) -> dict:
    """Per-row statistics of one layer's logits ``z`` [C, V] (float32) as named columns."""
    t_ids = _target_ids(targets, z.shape[0], z.device)
    stats = engine.row_stats(z, p_final, neg_h_final, t_ids)
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
    decodes through `engine.rescored_stats` (top-1 and targets exact; ``redone`` counts rows decoded whole)."""
    L = adapter.num_layers
    frames = []
    half = dtype in (torch.bfloat16, torch.float16)
    t_ids = _target_ids(targets, h.shape[1], h.device)
    with torch.no_grad():
        teacher = engine.Teacher(adapter, h[L], torch.float32 if half else dtype, keep_logits=True)  # exact
        final = None  # layer L's statistics: the same for every lens (`Lens.state` is h itself there)
        buf = None
        for lens_name, lens in lenses.items():
            for layer in range(L + 1):
                if not lens.has_layer(layer):
                    st = _absent(h.shape[1], list(targets), top_k, len(group_names), h.device)
                elif half and layer < L and top_k == 1:  # the statistics without making float32 logits
                    stats, n = engine.rescored_stats(adapter, lens.state(h[layer], layer), dtype, teacher.p,
                                                    teacher.neg_entropy, t_ids, groups)
                    st, redone[0] = _named(stats, targets), redone[0] + n
                elif layer == L and final is not None:  # every lens reads the model's own output there
                    st = final
                else:
                    if layer == L:  # the model's own output (`Lens.state` is h there), decoded for the teacher
                        z = teacher.logits
                    elif half:
                        z, n = engine.decode_rescored(adapter, lens.state(h[layer], layer), dtype, t_ids)
                        redone[0] += n
                    else:  # into one buffer for the chunk (`engine.unembed`)
                        z = engine.decode(adapter, lens.state(h[layer], layer), dtype, out=buf)
                        buf = z if buf is None and z.dtype == torch.float32 else buf
                    st = _stats(z, teacher.p, teacher.neg_entropy, targets, groups, top_k)
                    if layer == L:
                        final = st
                frames.append(_rows(st, meta, lens_name, layer, targets, group_names))
    return _table(frames)


def _checked_item(item: TraceItem, i: int, target_names, vocab_size: int | None) -> tuple[torch.Tensor, list[int]]:
    """The item's token ids and positions (negative ones from the end), checked against its length, and its
    targets (one in-vocabulary id per position, the same names as the other items'): `lenses.base.door`."""
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


def _check_arguments(adapter, lenses, items, chunk, dtype, top_k, batch_size) -> tuple[list, torch.dtype]:
    """`trace`'s door (`lenses.base.door`): one line naming the argument, before any kernel runs; returns the items
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
    unembedding matmul dtype: float32, or bfloat16/float16 re-scored (`engine.decode_rescored`: top-1 ids,
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
    items, dtype = _check_arguments(adapter, lenses, items, chunk, dtype, top_k, batch_size)
    if parallel.sharded(adapter):  # one text per forward pass, every process in step (`parallel.even_forwards`)
        batch_size, share_prefix = 1, False
    rank = parallel.group()[0]
    parts = saved.Parts.of(adapter, lenses, items, (str(dtype), top_k, list(group_names), groups), rank)
    earlier, done, redone_before = parts.earlier() if parts and rank == 0 else ([], set(), 0)
    done = parallel.shared(done) if parts else done  # the first process reads them (others may be saving already)
    if groups is not None:
        groups = engine.TokenGroups(groups.to(adapter.device), len(group_names))
    target_names = sorted({n for it in items for n in it.targets})
    buffer = _Buffer(adapter, lenses, chunk, target_names, dict(groups=groups, group_names=group_names, dtype=dtype,
                                                                 top_k=top_k))
    prepared = _prepared(items, target_names, adapter.vocab_size)
    todo = _my_share([t for t in prepared if t[0] not in done])
    _run(adapter, todo, items, buffer, parts, batch_size, share_prefix, progress)
    frames = earlier + buffer.frames  # the saved rows once, from the first process
    if frames:
        df = pd.concat(frames, ignore_index=True)
    else:
        df = pd.DataFrame(columns=["lens", "item", "position", "layer", "top1_id", "top1_prob", "entropy", "kl"])
    df = df.sort_values(["lens", "item", "position", "layer"], kind="stable").reset_index(drop=True)
    df.attrs.update(decode_dtype=str(dtype).removeprefix("torch."),
                    rows_decoded_whole=buffer.redone[0] + redone_before,
                    texts_traced=len(todo), texts_resumed=len(done) if rank == 0 else 0)
    df = parallel.merged(df, ["lens", "item", "position", "layer"])  # under torchrun: every process's share
    saved.resumed_note(len(done), df.attrs["texts_traced"], len(prepared), rank)
    return df


def _run(adapter, todo: list, items: list, buffer: "_Buffer", parts, batch_size: int, share_prefix: bool,
         progress: bool) -> None:
    """Run the model on this process's texts ``todo`` and decode their states into ``buffer``, saving the
    finished texts' rows into ``parts`` as it goes (`lenses.tracing.saved`)."""
    from tqdm.auto import tqdm

    captured = states.current()  # states captured elsewhere (`lenses.tracing.states`): no forward pass
    if captured is not None:
        batch_size, share_prefix = 1, False
    todo, batch_size = _ordered(adapter, todo, batch_size)
    prefix = shared_prefix(adapter, todo) if share_prefix else None
    most = parallel.most_forwards(adapter, len(todo))  # before any pass: with sharded blocks all step together
    bar = tqdm(total=len(todo), desc="tracing", unit="text", disable=not progress)
    for batch in batches(todo, batch_size, adapter.device, prefix.length if prefix else 0):
        lifecycle.check_stop()  # a signal swallowed on its way (e.g. inside a __del__) still stops here
        got = ([(i, captured.hidden(ids, pos), pos) for i, ids, pos in batch] if captured is not None
               else hidden_of_batch(adapter, batch, prefix))
        for i, h, pos in got:
            buffer.add(i, h, pos, items[i].targets)
        bar.update(len(batch))
        if parts and parts.due():
            buffer.save(parts)
    bar.close()
    parallel.even_forwards(adapter, len(todo), most)
    buffer.flush(last=True)
    if parts:
        buffer.save(parts)


def _my_share(todo: list) -> list:
    """This process's share of the texts under torchrun (`lenses.tracing.parallel`: balanced by tokens), or all."""
    lengths = [len(ids) for _, ids, _ in todo]
    share = parallel.mine(lengths)
    if share is None:
        return todo
    rank, world = parallel.group()
    note = parallel.idle_note(len(todo))
    if note and rank == 0:
        print(note, file=sys.stderr)
    print(f"tracing: process {rank} of {world} takes {len(share)} of {len(todo)} texts "
          f"({sum(lengths[j] for j in share):,} of {sum(lengths):,} tokens)", file=sys.stderr)
    return [todo[j] for j in share]


def _ordered(adapter, todo: list, batch_size: int) -> tuple[list, int]:
    """The texts in the order they run, and the batch size: one at a time where padding would change the
    model's states (`padding_check`, with a warning), else longest first so that a batch holds texts of similar
    length (little padding); the table's rows are sorted by item at the end."""
    if batch_size > 1 and len(todo) > 1:
        reason = padding_check(adapter, [ids for _, ids, _ in todo])
        if reason:
            warnings.warn(f"tracing one text at a time: {reason}.", stacklevel=4)
            batch_size = 1
    if batch_size > 1:
        todo.sort(key=lambda t: -len(t[1]))
    return todo, batch_size


class _Buffer:
    """Hidden states of traced positions, decoded ``chunk`` positions at a time (`decode_chunk`) into ``frames``."""

    def __init__(self, adapter, lenses: dict, chunk: int, target_names: list[str], decoding: dict):
        self.adapter, self.lenses, self.chunk, self.decoding = adapter, lenses, chunk, decoding
        self.h, self.meta, self.targets = [], [], {n: [] for n in target_names}
        self.frames: list[pd.DataFrame] = []
        self.redone = [0]  # rows a 16-bit decode redid in float32
        self.saved = (0, 0)  # frames and redone rows already in a saved part (`save`)

    def save(self, parts: "saved.Parts") -> None:
        """Decode everything buffered and save the rows of the texts finished since the last save (`saved`)."""
        self.flush(last=True)
        frames, redone = self.frames[self.saved[0]:], self.redone[0] - self.saved[1]
        parts.save(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), redone)
        self.saved = (len(self.frames), self.redone[0])

    def add(self, i: int, h: torch.Tensor, pos: list[int], targets: dict) -> None:
        self.h.append(h)
        self.meta.append(np.stack([np.full(len(pos), i), np.asarray(pos)], axis=1))
        for n in self.targets:
            self.targets[n].append(torch.as_tensor(list(targets[n]), dtype=torch.long))
        if sum(x.shape[1] for x in self.h) >= self.chunk:
            self.flush()

    def flush(self, last: bool = False) -> None:
        """Decode the buffered positions in chunks of ``chunk``; until the ``last`` call a partial chunk stays
        in the buffer (small matmuls waste the vocabulary work's best shape)."""
        if not self.h:
            return
        chunk, d = self.chunk, self.decoding
        h_all, meta = torch.cat(self.h, dim=1), np.concatenate(self.meta)
        tg_all = {n: torch.cat(v) for n, v in self.targets.items()}
        self.h, self.meta, self.targets = [], [], {n: [] for n in self.targets}
        done = h_all.shape[1] if last else h_all.shape[1] // chunk * chunk
        if done < h_all.shape[1]:
            self.h.append(h_all[:, done:].clone()), self.meta.append(meta[done:])
            for n, v in tg_all.items():
                self.targets[n].append(v[done:])
        for s in range(0, done, chunk):
            tg = {n: v[s : s + chunk].to(self.adapter.device) for n, v in tg_all.items()}
            self.frames.append(decode_chunk(self.adapter, self.lenses, h_all[:, s : s + chunk], meta[s : s + chunk],
                                            tg, d["groups"], d["group_names"], d["dtype"], d["top_k"], self.redone))
