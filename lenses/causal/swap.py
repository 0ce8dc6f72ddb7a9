"""The causal swap benchmark: for a prompt whose answer the model gets right, decompose the last position's
``hidden[l]`` over a lens's token dictionary (its directions of every token at ``l``), swap the answer's
coordinate for another token's (`lenses.causal.decompose.patch_coordinate`), run the model on, and count a
success when the model's final top-1 becomes the other token. The control moves the state by the same norm
along a random direction. An answer absent from the decomposition cannot be swapped: a failure, counted
separately (``in_support``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lenses.causal.decompose import decompose, patch_coordinate
from lenses.causal.edits import random_units
from lenses.model.intervene import edit_residual, final_logits


@dataclass
class SwapPrompt:
    ids: torch.Tensor  # [1, T]: the prompt; its last position predicts the answer
    answer: int  # the answer's (first) token, the model's own top-1 there
    target: int  # the token to swap in
    states: torch.Tensor  # [L+1, d]: hidden[l] at the last position


def _top1_after(adapter, ids: torch.Tensor, layer: int, delta: torch.Tensor) -> int:
    def move(h):
        out = h.clone()
        out[:, -1] = h[:, -1] + delta.to(h)
        return out

    with edit_residual(adapter, {layer: move}):
        return int(final_logits(adapter, ids)[0, -1].argmax())


def swap_trial(adapter, prompt: SwapPrompt, layer: int, dictionary: torch.Tensor, alpha: float = 1.0,
               k: int = 10, seed: int = 0) -> dict:
    """``{in_support, success, control}`` (0/1 each) for one prompt at one layer."""
    h = prompt.states[layer]
    dec = decompose(h, dictionary, k, dtype=dictionary.dtype)
    if prompt.answer not in dec.support.tolist():
        return {"in_support": 0.0, "success": 0.0, "control": 0.0}
    patch = patch_coordinate(h, dictionary, prompt.answer, prompt.target, "swap", alpha, decomposition=dec)
    random = random_units(1, h.shape[-1], seed)[0] * patch.delta.norm()
    with torch.no_grad():
        success = _top1_after(adapter, prompt.ids, layer, patch.delta) == prompt.target
        control = _top1_after(adapter, prompt.ids, layer, random) == prompt.target
    return {"in_support": 1.0, "success": float(success), "control": float(control)}
