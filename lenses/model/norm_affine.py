"""The final norm as an affine map at a fixed scale: ``norm(x) = g * (C x) / sigma(x) + beta``.

RMSNorm (``C = I``), LayerNorm (``C = I - 11^T/d``, the mean removed) and Gemma's ``(1 + w)`` RMSNorm all have
this form, with ``sigma(x) = sqrt(mean((C x)^2) + eps)`` a positive scalar per state. Lens directions
(`lenses.kinds.lens.Lens.directions`) need ``g``, ``beta`` and whether ``C`` centres. They are found by
measurement, not by reading the module's class or attribute names, and then proved:

1. ``beta = norm(0)`` (``sigma(0) = sqrt(eps)`` multiplies zero);
2. centring: ``norm(x + c 1) == norm(x)`` for a large shift ``c`` (LayerNorm forgets the mean, RMSNorm does not);
3. ``g``: least squares per coordinate of ``norm(x) - beta`` against ``(C x) / sigma(x)`` over random large
   states (``eps`` is negligible against their scale);
4. proof: the fitted form reproduces the norm on fresh random states (relative error below 1e-3 in float32,
   1e-2 in 16-bit); otherwise the norm is not of this form and the model has no lens directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lenses.base.errors import LensesError


@dataclass(frozen=True)
class NormAffine:
    """``norm(x) = weight * (C x) / sigma(x) + bias`` with ``C`` centring when ``centred``."""

    weight: torch.Tensor  # g [d], float64
    bias: torch.Tensor  # beta [d], float64
    centred: bool

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """``C x`` (the mean over the last dimension removed when the norm centres)."""
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """``sigma(x)`` [...] without eps (the states a lens reads are far from zero)."""
        return self.centre(x).pow(2).mean(-1).sqrt()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.to(x) * self.centre(x) / self.scale(x)[..., None] + self.bias.to(x)


def _states(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 30.0 * torch.randn(n, d, generator=g, dtype=torch.float64) + 5.0 * torch.randn(1, d, generator=g,
                                                                                            dtype=torch.float64)


def norm_affine(norm, d: int, device, dtype: torch.dtype, what: str = "the final norm") -> NormAffine:
    """Measure and prove the affine form of ``norm`` (a callable on ``[..., d]`` states; rules in the module
    docstring). Raises `LensesError` naming ``what`` when the norm is not of that form."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return norm(x.to(device=device, dtype=dtype)).double().cpu()

    zero = run(torch.zeros(1, d, dtype=torch.float64))[0]
    x = _states(64, d, seed=0)
    shifted = run(x + 100.0)
    plain = run(x)
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 2e-2
    centred = bool((shifted - plain).abs().max() <= tol * plain.abs().max())
    probe = NormAffine(torch.ones(d, dtype=torch.float64), zero, centred)
    y = probe.centre(x) / probe.scale(x)[:, None]
    weight = ((plain - zero) * y).sum(0) / y.pow(2).sum(0).clamp_min(1e-30)
    fitted = NormAffine(weight, zero, centred)
    fresh = _states(32, d, seed=1)
    want, got = run(fresh), fitted.apply(fresh)
    err = float((want - got).abs().max() / want.abs().max().clamp_min(1e-30))
    if not err <= tol * 10:
        raise LensesError(f"{what} is not an RMSNorm or LayerNorm at a fixed scale (the affine form misses it "
                          f"by {err:.1e} relative), so this model has no linear lens directions; the views that "
                          "decode still work, the interventions along lens directions do not.")
    return fitted
