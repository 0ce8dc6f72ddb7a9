"""Patchscopes (Ghandeharioun et al. 2024, arXiv 2401.06102): read a state by patching it into another prompt.

``patchscope(adapter, tokenizer, state, layer)`` writes ``state`` over ``hidden[layer]`` of the target prompt
at ``position`` and returns the model's next-token distribution at the target's last position (and, with
``generate=N``, the N tokens it then writes greedily, the state patched in every forward pass). The default
target is the paper's identity prompt, whose few-shot pattern ``x -> x`` asks the model to repeat what the
patched position holds. ``patchscope_grid`` does it for the last position of a source prompt at every layer:
one row per source layer. Layer numbers are ours (``hidden[l]``, the input of block ``l``): nnterp's
``patchscope_lens`` layer ``i`` (the output of block ``i``) is our ``i + 1``.
"""

from __future__ import annotations

import torch

from lenses.base.errors import LensesError
from lenses.model.intervene import check_layer, edit_residual, final_logits
from lenses.text import convention

IDENTITY_PROMPT = "cat -> cat; 1135 -> 1135; hello -> hello; ?"
MAX_GENERATE = 64


def _encode(tokenizer, text: str) -> torch.Tensor:
    if not text.strip():
        raise LensesError("the target prompt is empty; give a prompt such as the identity prompt "
                          f"{IDENTITY_PROMPT!r}.")
    return torch.tensor([convention.encode(tokenizer, text)])


def _patched(adapter, ids: torch.Tensor, layer: int, position: int, state: torch.Tensor) -> torch.Tensor:
    """Next-token logits [V] at the last position of ``ids`` with ``hidden[layer][position] <- state``."""
    def put(h):
        out = h.clone()
        out[:, position] = state.to(h)
        return out

    with edit_residual(adapter, {layer: put}):
        return final_logits(adapter, ids)[0, -1]


def patchscope(adapter, tokenizer, state: torch.Tensor, layer: int, target_prompt: str = IDENTITY_PROMPT,
               position: int = -1, generate: int = 0) -> tuple[torch.Tensor, list[int]]:
    """``(probabilities [V] of the next token, the ids generated after it)`` with ``state`` [d] patched into
    ``hidden[layer]`` of ``target_prompt`` at ``position``."""
    check_layer(adapter, layer)
    ids = _encode(tokenizer, target_prompt)
    if not -ids.shape[1] <= position < ids.shape[1]:
        raise LensesError(f"position {position} is outside the target prompt's {ids.shape[1]} tokens.")
    if not 0 <= generate <= MAX_GENERATE:
        raise LensesError(f"generate must lie in 0..{MAX_GENERATE} (got {generate}).")
    position = position % ids.shape[1]  # absolute, so it stays put as tokens are generated
    logits = _patched(adapter, ids, layer, position, state)
    probs, written = logits.softmax(-1), []
    for _ in range(generate):
        written.append(int(logits.argmax()))
        ids = torch.cat([ids, torch.tensor([[written[-1]]])], 1)
        logits = _patched(adapter, ids, layer, position, state)
    return probs, written


def source_states(adapter, tokenizer, source_prompt: str | list[int], position: int = -1) -> torch.Tensor:
    """``hidden[l]`` of ``source_prompt`` (a text, read as the tokenizer gives it, or its token ids, e.g. a chat
    turn) at ``position`` for every layer: [L+1, d]."""
    ids = torch.tensor([source_prompt]) if isinstance(source_prompt, list) else _encode(tokenizer, source_prompt)
    with torch.no_grad():
        return adapter.hidden_states(ids)[:, 0, position]


def patchscope_grid(adapter, tokenizer, source_prompt: str | list[int], layers: list[int] | None = None,
                    target_prompt: str = IDENTITY_PROMPT, position: int = -1) -> torch.Tensor:
    """Probabilities [len(layers), V]: the last position of ``source_prompt`` read through the target prompt at
    each layer (default every layer 0..L)."""
    layers = list(range(adapter.num_layers + 1)) if layers is None else list(layers)
    for layer in layers:
        check_layer(adapter, layer)
    states = source_states(adapter, tokenizer, source_prompt)
    return torch.stack([patchscope(adapter, tokenizer, states[l], l, target_prompt, position)[0] for l in layers])
