"""Rule 8 of `lenses.model.discovery` (on demand): the two parts of a block, whose outputs the block adds to
the residual stream (attention or another mixer, then the MLP), found by structure and proved numerically."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from lenses.base.errors import UnsupportedModelError


@dataclass
class BlockParts:
    """Per block, the children whose outputs the block adds to the residual stream:
    ``hidden[l+1] = hidden[l] + out(first[l]) + out(second[l])``. ``first`` mixes positions (attention, or a
    state-space/recurrent mixer: ``mixer[l]`` says which), ``second`` is the MLP or mixture of experts (None
    for a block with a mixer only, e.g. Mamba's: its MLP part is zero)."""

    first: list[str]
    second: list[str | None]
    mixer: list[str]


def first_tensor(output):
    """A module's main output: itself, or the first element of a tuple (attention returns ``(out, weights)``)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if torch.is_tensor(output) else None


def parts_tolerance(before: torch.Tensor, after: torch.Tensor) -> float:
    """How far ``before + parts`` may be from ``after`` and still add up: 1e-4 of the block's update, or the
    rounding of the stream itself (64 units in the last place of its largest value: large residual values
    make ``after - before`` inexact in float32, let alone in 16 bits), whichever is larger."""
    eps = torch.finfo(after.dtype).eps if after.is_floating_point() else 1e-7
    update = float((after - before).float().abs().amax())
    stream = float(torch.maximum(before.abs().amax(), after.abs().amax()).float())
    return max(1e-4 * update, 64 * eps * stream, 1e-12)


def _mixer_kind(block: nn.Module, name: str, order: list[str]) -> str:
    owner = _owner(block, name, order)
    attention = any(re.search("atten|attn", type(m).__name__, re.I) for m in owner.modules())
    return "attention" if attention else "state-space/recurrent mixer"


def first_outputs(named: list[list[tuple[str, torch.nn.Module]]], run):
    """``(outputs, run())``: ``run`` called with a hook on each named module of each block; ``outputs[i]`` maps
    each name to the first output tensor of its first call, in call order, cloned (a block may add to it in
    place, as Falcon's does)."""
    outs: list[dict[str, torch.Tensor]] = [{} for _ in named]

    def grab(i, name, module, args, output):
        t = first_tensor(output)
        if t is not None and name not in outs[i]:
            outs[i][name] = t.detach().clone()

    hooks = [module.register_forward_hook(partial(grab, i, name))
             for i, modules in enumerate(named) for name, module in modules]
    try:
        result = run()
    finally:
        for h in hooks:
            h.remove()
    return outs, result


def find_block_parts(layers: nn.ModuleList, hidden_states) -> BlockParts:
    """Rule 8: for each block, the two direct children whose outputs sum to what the block adds
    (``hidden[l+1] - hidden[l]``, on the short pass ``hidden_states()``, which returns the residual stream
    [L+1, ...]), or one child that adds it all (a mixer-only block). Sequential and parallel blocks,
    post-norms (the pair is then the post-norms, whose outputs are what is added), mixture-of-experts MLPs
    and hybrids whose blocks differ are found alike. Refuses, with the reason, a block where no children add
    up (parts that add the residual themselves, e.g. BLOOM's, or more than two branches)."""
    outs, hidden = first_outputs([list(block.named_children()) for block in layers], hidden_states)
    order = [list(o) for o in outs]
    first, second, mixer = [], [], []
    for i, block in enumerate(layers):
        delta = (hidden[i + 1] - hidden[i]).float()
        tol = parts_tolerance(hidden[i], hidden[i + 1])
        out = {n: outs[i][n].float().reshape(delta.shape) for n in order[i] if outs[i][n].numel() == delta.numel()}
        names = list(out)
        err = {(a, b): (out[a] + out[b] - delta).abs().amax() for j, a in enumerate(names) for b in names[j + 1:]}
        err.update({(a, None): (out[a] - delta).abs().amax() for a in names})
        best = min(err, key=lambda k: float(err[k]), default=None)
        if best is None or not float(err[best]) <= tol:
            kinds = sorted({type(c).__name__ for c in block.children()})
            raise UnsupportedModelError(
                f"no parts of block {i} ({type(block).__name__}: children {', '.join(kinds)}) add up to what it adds "
                "to the residual stream: its parts add the residual themselves or it has more than two branches, "
                "so it has no attention/MLP decomposition here (the per-layer lenses still work)."
            )
        a, b = best
        first.append(a), second.append(b), mixer.append(_mixer_kind(block, a, order[i]))
    return BlockParts(first, second, mixer)


def _owner(block: nn.Module, name: str, order: list[str]) -> nn.Module:
    """The child that makes part ``name``'s contribution: itself, or for a post-norm the child called just
    before it (Gemma 2's ``post_attention_layernorm`` normalises ``self_attn``'s output)."""
    child = getattr(block, name)
    if re.search("norm", type(child).__name__, re.I) and order.index(name) > 0:
        return getattr(block, order[order.index(name) - 1])
    return child
