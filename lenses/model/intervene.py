"""Interventions on the residual stream, as pre-hooks on the modules the adapter reads.

``hidden[l]`` (our layer convention) is the input of block ``l`` for ``l < L`` and the input of the
final norm for ``l = L``; an edit of ``hidden[l]`` is therefore a forward pre-hook on that module
that replaces its hidden-state argument. Everything downstream (later blocks, the final norm, the
unembedding, and `ModelAdapter.hidden_states` recording) sees the edited value. Hooks work under a
device map (the edit runs on the module's device) and are always removed, even after an error.

- `edit_residual(adapter, {l: fn})`: ``hidden[l] <- fn(hidden[l])`` during the ``with`` block.
- `skip_block(adapter, l, update=None)`: block ``l``'s residual update is replaced by ``update``
  (zero by default; e.g. its corpus mean): ``hidden[l+1] <- hidden[l] + update``.
- `final_logits(adapter, ids)`: the model's logits.
- `last_stream(adapter, ids, edits)`: ``hidden[L]`` at one position under edits, without the
  ``[tokens x vocab]`` logits of every position (decode it with any lens at layer L).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable

import torch

from lenses.base.errors import LensesError
from lenses.model.adapter import ModelAdapter, stream_arg, with_stream

Edit = Callable[[torch.Tensor], torch.Tensor]


def check_layer(adapter: ModelAdapter, layer: int, what: str = "layer") -> None:
    if not 0 <= layer <= adapter.num_layers:
        raise LensesError(f"{what} {layer} is out of range: this model has hidden states 0..{adapter.num_layers} "
                          f"(0 = embeddings, {adapter.num_layers} = the last block's output).")


def _hook(fn: Edit):
    def pre_hook(module, args, kwargs):
        return with_stream(args, kwargs, fn(stream_arg(args, kwargs)))

    return pre_hook


@contextmanager
def edit_residual(adapter: ModelAdapter, edits: dict[int, Edit]):
    """Within the block, ``hidden[l]`` is replaced by ``edits[l](hidden[l])`` on every forward pass."""
    for l in edits:
        check_layer(adapter, l)
    handles = [h for l, fn in sorted(edits.items()) for h in adapter.hook_stream(l, _hook(fn))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def skip_block(adapter: ModelAdapter, layer: int, update: torch.Tensor | None = None):
    """Block ``layer`` (0..L-1) contributes ``update`` ([d], default zero) instead of its own update."""
    if not 0 <= layer < adapter.num_layers:
        raise LensesError(f"block {layer} is out of range: this model has blocks 0..{adapter.num_layers - 1}.")
    seen: list[torch.Tensor] = []

    def remember(h):
        seen.append(h)
        return h

    def replace(h):
        before = seen.pop()
        return before + update.to(before) if update is not None else before

    with ExitStack() as stack:
        stack.enter_context(edit_residual(adapter, {layer: remember}))
        stack.enter_context(edit_residual(adapter, {layer + 1: replace}))
        yield


def final_logits(adapter: ModelAdapter, ids: torch.Tensor) -> torch.Tensor:
    """The model's own logits ``[batch, seq, vocab]`` (float32) for ``ids``."""
    with torch.no_grad():
        out = adapter.model(input_ids=ids.to(adapter._input_device()), use_cache=False)
    return out.logits.float()


def last_stream(adapter: ModelAdapter, ids: torch.Tensor, edits: dict[int, Edit] | None = None,
                position: int = -1, **forward) -> torch.Tensor:
    """``hidden[L]`` at ``position`` ([batch, d]) of a forward pass of ``ids`` under ``edits``
    (``forward``: extra model arguments, e.g. a cache of the prompt's prefix)."""
    L = adapter.num_layers
    edits = dict(edits or {})
    captured: list[torch.Tensor] = []
    inner = edits.get(L, lambda h: h)

    def grab(h):
        h = inner(h)
        captured.append(h[:, position].detach())
        return h

    edits[L] = grab
    with edit_residual(adapter, edits):
        adapter.run_stream(ids, **forward)
    return captured[0].to(adapter.device)
