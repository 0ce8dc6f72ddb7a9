"""The causal swap benchmark: for a prompt whose answer the model gets right, edit ``hidden[l]`` at the last
position so that the lens reads another token where it read the answer, run the model on, and count a success
when the model's final top-1 becomes that token. Two edits, both along the lens's directions (`Lens.directions`):

- ``swap`` (`swap_reading`): the smallest change of the state that exchanges the two tokens' lens logits while the
  lens's next ``hold`` tokens keep theirs (a least-norm solution of ``hold + 2`` linear conditions). At the last
  layer every lens reads the model's output, so this edit *is* the model's swap: success there is the identity
  the benchmark rests on (the tests require 95%).
- ``pair-swap`` (`lenses.causal.edits.swap_pair`): the J-lens paper's exchange of the two tokens' coordinates in
  the span of their two directions (``alpha`` 2: its "double strength").

The control moves the state as far as ``swap`` does, along a random direction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lenses.causal.edits import random_units, swap_pair
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


HOLD = 20  # the lens's next tokens whose logits the swap keeps


def swap_reading(lens, layer: int, h: torch.Tensor, source: int, target: int, hold: int = HOLD,
                 alpha: float = 1.0) -> torch.Tensor:
    """The least-norm change [d] of the state ``h`` [d] after which the lens at ``layer`` gives ``target`` the
    logit ``source`` had and ``source`` the target's (to first order: the norm's one scale 1/sigma aside), its
    ``hold`` next-best tokens unchanged; ``alpha`` scales it."""
    with torch.no_grad():
        z = lens(h.float(), layer)
    others = [int(i) for i in z.topk(hold + 2).indices if int(i) not in (source, target)][:hold]
    D = lens.directions(layer, [source, target] + others)
    scores = D.vectors @ h.double() + D.offset
    wanted = torch.zeros_like(scores)
    wanted[0], wanted[1] = scores[1] - scores[0], scores[0] - scores[1]
    return alpha * (torch.linalg.pinv(D.vectors) @ wanted)


def swap_trial(adapter, lens, prompt: SwapPrompt, layer: int, alpha: float = 1.0, seed: int = 0) -> dict:
    """``{swap, pair-swap, control}`` (0/1: the final top-1 became the target) for one prompt at one layer, and
    ``step`` (the swap's size relative to the state)."""
    h = prompt.states[layer].double()
    delta = swap_reading(lens, layer, h, prompt.answer, prompt.target, alpha=alpha)
    v = lens.directions(layer, [prompt.answer, prompt.target]).vectors
    pair = swap_pair(h, v[0], v[1], alpha) - h
    random = random_units(1, h.shape[-1], seed)[0] * delta.norm()
    with torch.no_grad():
        hits = {name: float(_top1_after(adapter, prompt.ids, layer, d) == prompt.target)
                for name, d in (("swap", delta), ("pair-swap", pair), ("control", random))}
    return {**hits, "step": float(delta.norm() / h.norm())}
