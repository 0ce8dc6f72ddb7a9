"""Half-precision backward passes for the Jacobian-lens fit, and the rule that says whether they are precise
enough: their J must be closer to the float32 J than a tenth of J's own sampling error over prompts.

1. `half_backward`: while the fit records its graph, every linear layer of the blocks runs its forward in its
   own dtype (the states, and so the Jacobian being measured, are the model's own) and its input-gradient
   matmul in ``dtype`` (bfloat16: 2.7x float32's speed on an AVX512-BF16 CPU); the gradient arrives and leaves
   in float32, and the residual stream, attention and norms stay in float32. The weights' bfloat16 copies are
   rounded stochastically, drawn anew for every prompt: unbiased, so the rounding averages out over prompts.
2. The sums over positions, rows and prompts stay in float32 (`lenses.jobs.jlens_estimator`): the rounding
   of each backward pass is then noise that averages out over positions and prompts.
3. `Spread`: running sums of ``J_p`` and ``J_p^2`` give, per layer, the ideal bootstrap's standard error of the
   mean J over the prompts (resampling prompts with replacement, infinitely many times: the plug-in variance
   divided by the number of prompts), as a Frobenius norm; `deviation_rule` compares a fit against it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

ACCUMULATE = torch.float32  # the dtype of the fit's sums (a float64 model's: float64)
RULE = 0.1  # a fit's deviation from the float32 J must be below this share of J's sampling error (per layer)


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fit sums in: `ACCUMULATE`, or float64 for a float64 model."""
    return torch.float64 if dtype == torch.float64 else ACCUMULATE


class _HalfGradLinear(torch.autograd.Function):
    """``x W^T + b`` forward in the weights' dtype; the input gradient ``g W`` in the dtype of ``half``."""

    @staticmethod
    def forward(ctx, x, weight, bias, half):
        ctx.half = half
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        return (g.to(ctx.half.dtype) @ ctx.half).to(g.dtype), None, None, None


def stochastic_round(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``w`` (float32) rounded to bfloat16 up or down at random, with the probabilities that make the rounding
    unbiased (``E[round(w)] = w``): a random 16-bit number added to the bits that bfloat16 drops, then dropped."""
    noise = torch.randint(0, 1 << 16, w.shape, dtype=torch.int32, generator=generator, device="cpu").to(w.device)
    bits = (w.float().contiguous().view(torch.int32) + noise) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


@contextmanager
def half_backward(adapter, dtype: torch.dtype | None, seed: int = 0):
    """Within this block, graphs recorded through ``adapter``'s blocks multiply their input gradients in ``dtype``
    (None or float32: unchanged). bfloat16 copies of the weights are rounded stochastically (`stochastic_round`,
    drawn from ``seed``): the backward is a product of one matrix per layer, each copy unbiased and drawn
    independently, so the fit's J is unbiased, where rounding to nearest gives every prompt the same bias (a
    systematic error that more prompts never average out). The copies live as long as the graphs."""
    if dtype is None or dtype == torch.float32:
        yield
        return
    linears = [m for m in adapter.layers.modules() if type(m) is nn.Linear]
    generator = torch.Generator().manual_seed(seed)
    for m in linears:
        w = m.weight.detach()
        half = stochastic_round(w, generator) if dtype == torch.bfloat16 and w.dtype == torch.float32 else w.to(dtype)
        m.forward = (lambda x, m=m, half=half: _HalfGradLinear.apply(x, m.weight, m.bias, half))
    try:
        yield
    finally:
        for m in linears:
            del m.forward


class Spread:
    """Running sums of per-prompt ``J_p`` [layers, d, d] and of their squares (float64)."""

    def __init__(self):
        self.sum = self.sq = None
        self.n = 0

    def add(self, J: torch.Tensor) -> None:
        J = J.double()
        self.sum = J.clone() if self.sum is None else self.sum + J
        self.sq = J * J if self.sq is None else self.sq + J * J
        self.n += 1

    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    def standard_error(self) -> torch.Tensor:
        """Per layer: the Frobenius norm of the ideal bootstrap's standard error of the mean J."""
        var = (self.sq / self.n - self.mean() ** 2).clamp_min(0)  # plug-in variance of one prompt's J
        return (var.sum((-2, -1)) / self.n).sqrt()


def deviation_rule(J: torch.Tensor, reference: Spread) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(deviation, standard error, passes)`` per layer: ``|J - reference mean|_F`` against the reference's
    sampling error; passes where every layer's deviation is below `RULE` times its error."""
    dev = (J.double() - reference.mean()).norm(dim=(-2, -1))
    se = reference.standard_error()
    return dev, se, bool((dev < RULE * se).all())
