"""A model's identity to which every weight contributes (what a lens and a checkpoint are checked against).

Per parameter tensor ``w`` (every one the model has, by name; tied weights once): its norm ``‖w‖`` and
two projections onto fixed ±1 patterns (`_SIGNS`, tiled over the flattened tensor), divided by ``‖w‖``.
For weights of any structure the projections are O(1) numbers; two different models give unrelated
ones, a scaled tensor changes its norm, and a dtype cast or quantization moves them a little. The
rules, comparing a saved fingerprint with the model at hand, per tensor (the worst tensor decides):

1. ``scale = |ln(‖a‖ / ‖b‖)|`` and ``proj = max |proj_a - proj_b|``; a tensor present in one only is
   a different model.
2. ``scale <= 0.01 and proj <= 0.01`` (`SAME`): the same weights up to a cast (bfloat16: proj ~0.005).
3. ``scale <= 0.03 and proj <= 0.6`` (`CLOSE`): a close variant. Measured on SmolLM2-135M and
   Gemma-3-270m: int8 weight-only proj 0.03-0.04, int4 in groups scale 0.01 and proj 0.35-0.38.
4. above: another model (one tensor scaled by 1.05 gives scale 0.049; unrelated weights proj ~1).

Cost: one pass over the weights in float64 chunks (a few seconds per billion parameters on a CPU),
once per model object (cached on it).
"""

from __future__ import annotations

import math

import torch

from lenses.base.errors import LensMismatchError

VERSION = 1
SAME, CLOSE = (0.01, 0.01), (0.03, 0.6)  # (scale, proj) bounds of rules 2 and 3
_WIDTH = 4099  # the period of the sign patterns (a prime: no tensor's row length is a multiple of it)


def _patterns() -> torch.Tensor:
    """Two fixed ±1 patterns of `_WIDTH` [2, W], the same on every machine (an integer hash, no RNG)."""
    i = torch.arange(_WIDTH, dtype=torch.int64)
    out = []
    for k in (1, 2):
        h = (i * 2654435761 + k * 2246822519) % (2**32)
        h = (h ^ (h >> 13)) * 3266489917 % (2**32)
        out.append(((h >> 16) & 1).double() * 2 - 1)
    return torch.stack(out)


_SIGNS = _patterns()


def plain(w: torch.Tensor) -> torch.Tensor:
    """``w`` as an ordinary tensor: a quantized weight (a torchao tensor subclass) dequantized."""
    return w.dequantize() if type(w) not in (torch.Tensor, torch.nn.Parameter) and hasattr(w, "dequantize") else w


def tensor_summary(w: torch.Tensor, chunk: int = 1 << 22) -> list[float]:
    """``[‖w‖, proj_1 / ‖w‖, proj_2 / ‖w‖]`` of one tensor, in float64 chunks (bounded memory)."""
    flat = plain(w.detach()).reshape(-1)
    signs = _SIGNS.to(flat.device)
    sq, proj = 0.0, torch.zeros(2, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), chunk - chunk % _WIDTH):
        part = flat[start:start + chunk - chunk % _WIDTH].double()
        sq += float(part.square().sum())
        pad = -part.numel() % _WIDTH
        cols = torch.nn.functional.pad(part, (0, pad)).view(-1, _WIDTH).sum(0)
        proj += signs @ cols
    norm = math.sqrt(sq)
    return [round(norm, 6)] + [round(float(p) / norm, 6) if norm else 0.0 for p in proj]


def of_model(model: torch.nn.Module) -> dict | None:
    """``{"version", "tensors": {name: summary}}`` of every materialised parameter, under every name it has
    (tied weights are summarised once: a quantized copy may untie them; GPT-2's ``Conv1D`` weights as the
    ``nn.Linear`` they equal, [out, in]). None if any is on the meta device
    (offloaded weights are not read)."""
    params = list(model.named_parameters(remove_duplicate=False))
    if any(p.device.type == "meta" for _, p in params):
        return None
    transposed = {id(m.weight) for m in model.modules() if type(m).__name__ == "Conv1D"}  # stored [in, out]
    done: dict[int, list[float]] = {}
    with torch.no_grad():
        for _, p in params:
            if id(p) not in done:
                done[id(p)] = tensor_summary(p.T if id(p) in transposed else p)
    return {"version": VERSION, "tensors": {name: done[id(p)] for name, p in params}}


def delta(a: list[float], b: list[float]) -> tuple[float, float]:
    """Rule 1 for one tensor: ``(|ln(‖a‖/‖b‖)|, max |proj_a - proj_b|)``."""
    na, nb = float(a[0]), float(b[0])
    if na == 0 or nb == 0:
        scale = 0.0 if na == nb else math.inf
    else:
        scale = abs(math.log(na / nb))
    return scale, max([0.0] + [abs(float(x) - float(y)) for x, y in zip(a[1:], b[1:])])


def _verdict(scale: float, proj: float) -> str:
    if scale <= SAME[0] and proj <= SAME[1]:
        return "same"
    return "close" if scale <= CLOSE[0] and proj <= CLOSE[1] else "other"


def compare(saved: dict, mine: dict) -> tuple[str, str, str]:
    """``(verdict, tensor, how)``: verdict ``same``, ``close`` or ``other`` (rules 2-4) of the tensor that
    differs most, and how it differs in words. Raises ValueError on a malformed saved fingerprint."""
    theirs, ours = saved["tensors"], mine["tensors"]
    if not isinstance(theirs, dict):
        raise ValueError("tensors is not a mapping")
    missing = sorted(set(theirs) ^ set(ours))
    if missing:
        return "other", missing[0], "present in one model only"
    rank = {"same": 0, "close": 1, "other": 2}
    worst = ("same", "", 0.0, 0.0)
    for name, summary in ours.items():
        scale, proj = delta(theirs[name], summary)
        verdict = _verdict(scale, proj)
        if (rank[verdict], scale + proj) > (rank[worst[0]], worst[2] + worst[3]) or not worst[1]:
            worst = (verdict, name, scale, proj)
    verdict, name, scale, proj = worst
    return verdict, name, f"norm x{math.exp(scale):.3g}, projections moved by {proj:.3g}"


def same_model(a: dict | None, b: dict | None) -> bool | None:
    """Whether two saved model fingerprints (``ModelAdapter.fingerprint``) are of the same weights (rule 2;
    a cast counts as the same); None where they cannot be compared (one lacks ``weights``)."""
    wa, wb = (a or {}).get("weights"), (b or {}).get("weights")
    if not isinstance(wa, dict) or not isinstance(wb, dict):
        return None
    try:
        return compare(wa, wb)[0] == "same"
    except (KeyError, TypeError, ValueError, IndexError):
        return False


# --------------------------------------------------------------------------- a model adapter's identity


def _block_probe(block: torch.nn.Module) -> list[float]:
    """The older probe (lenses saved before `of_model`): 4 evenly spaced values of a block's first, middle and
    last parameter (empty where the weights are not materialised, e.g. offloaded to the meta device)."""
    params = [p for p in block.parameters() if p.numel() >= 4]
    if not params or any(p.device.type == "meta" for p in params):
        return []
    out = []
    for p in dict.fromkeys([params[0], params[len(params) // 2], params[-1]]):
        flat = plain(p.detach()).reshape(-1)
        idx = torch.tensor([i * (flat.numel() - 1) // 3 for i in range(4)], device=flat.device)
        out += [round(float(v), 6) for v in flat[idx].float().cpu()]
    return out


def of_adapter(adapter) -> dict:
    """A `lenses.model.adapter.ModelAdapter`'s fingerprint: its shapes, ``weights`` (`of_model`), whether it was
    quantized after loading, and the older probes (16 values of the unembedding, 12 of every block)."""
    w = plain(adapter.unembed.weight.detach()).reshape(-1)
    idx = torch.tensor([i * (w.numel() - 1) // 15 for i in range(16)], device=w.device)
    return {
        "model_type": getattr(adapter.model.config, "model_type", "unknown"),
        "num_layers": adapter.num_layers,
        "d_model": adapter.d_model,
        "vocab_size": adapter.vocab_size,
        "unembed_probe": [round(float(v), 6) for v in w[idx].float().cpu()],
        "block_probe": [_block_probe(block) for block in adapter.layers],
        "weights": of_model(adapter.model),
        "quantized": getattr(adapter.model.config, "lenses_quantized", None),
    }


def check(saved: dict, mine: dict, what: str = "lens", strict: bool = True) -> str | None:
    """Refuse (`LensMismatchError`, naming what differs) a ``saved`` fingerprint of another model than ``mine``;
    return a one-line note where it is read anyway (a quantized copy of its model, or ``strict=False``)."""
    for key in ("num_layers", "d_model", "vocab_size"):
        if key in saved and saved[key] != mine[key]:
            raise LensMismatchError(
                f"this {what} was trained for a model with {key}={saved[key]}, but the model given has "
                f"{key}={mine[key]}. Load it onto the model it was trained for (see its config.json), "
                "or train a new one with train_probes.py.")
    if isinstance(saved.get("weights"), dict) and mine["weights"]:
        return _check_weights(saved, mine, what, strict)
    return None if not strict else _check_probes(saved, mine, what)


def _check_weights(saved: dict, mine: dict, what: str, strict: bool) -> str | None:
    try:
        verdict, part, differ = compare(saved["weights"], mine["weights"])
    except (KeyError, TypeError, ValueError, IndexError):
        raise LensMismatchError(f"the fingerprint of this {what} is malformed; re-save it with this version "
                                "of lenses.") from None
    quantized = mine.get("quantized") if mine.get("quantized") != saved.get("quantized") else None
    if verdict == "same" and not quantized:
        return None
    how = f"the weights of {part} differ: {differ}"
    if verdict != "other" and quantized:
        return f"note: this model is the {what}'s model quantized to {quantized} ({how}): read as a close variant."
    if not strict:
        return f"note: the {what} was made for another model ({how}); read anyway, as strict=False (--no-strict) asks."
    if verdict == "close":
        raise LensMismatchError(f"this model is a close variant of the {what}'s model ({how}, as a quantized or "
                                "fine-tuned copy gives): if you know it is one, pass --no-strict (strict=False).")
    raise LensMismatchError(f"this {what} was made for another model with the same shapes ({how}). Load it onto "
                            "the model it was made for, or pass --no-strict (strict=False) if you know the "
                            "weights are a close variant.")


def _check_probes(saved: dict, mine: dict, what: str) -> None:
    """The check of fingerprints saved before `of_model` (a few sampled values, 5% tolerance)."""
    probes = [("unembedding", saved.get("unembed_probe"), mine["unembed_probe"])]
    blocks = saved.get("block_probe")
    if isinstance(blocks, list) and len(blocks) == len(mine["block_probe"]):
        probes += [(f"block {l}", a, b) for l, (a, b) in enumerate(zip(blocks, mine["block_probe"]))]
    for part, theirs, ours in probes:
        if not theirs or not ours:  # not recorded (older files), or weights not materialised here
            continue
        try:
            a, b = torch.tensor(theirs, dtype=torch.float32), torch.tensor(ours, dtype=torch.float32)
        except (TypeError, ValueError):
            raise LensMismatchError(f"the fingerprint of this {what} is malformed ({part}); re-save it with "
                                    "this version of lenses.") from None
        if a.shape != b.shape or not torch.allclose(a, b, rtol=0.05, atol=0.05 * float(b.abs().mean()) + 1e-8):
            raise LensMismatchError(
                f"this {what} was made for another model with the same shapes (the weights of its {part} "
                "differ). Load it onto the model it was made for, or pass strict=False "
                "(analyze.py --no-strict) if you know the weights are a close variant (e.g. a quantised copy).")
