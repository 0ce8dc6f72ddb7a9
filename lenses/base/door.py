"""The door of the Python API: every public function checks its arguments here, before any kernel runs.

Each check returns the value in the form the code inside expects (a ``torch.dtype``, a long tensor, a
list of positions) or raises `ArgumentError`, a `LensesError` whose one line names the argument, what
it got, and what to pass instead. The rules, in the order a value meets them:

1. The type: a bool is not a number, a float is not a token id, a numpy array is not a tensor.
2. The shape and the range: layers in 0..L, token ids in 0..vocab-1, positions inside their item
   (negative ones count from the end, never wrap around), sizes at least 1 and at most their bound.
3. Where the data lives: a tensor on the ``meta`` device holds no numbers.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lenses.base.errors import LensesError

DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16, "half": torch.float16, "float64": torch.float64}

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class ArgumentError(LensesError, TypeError):
    """A public function got an argument of the wrong type, shape or range (the message names it)."""


def _got(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)} on {value.device}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def fail(name: str, value: Any, wanted: str) -> ArgumentError:
    return ArgumentError(f"{name} must be {wanted} (got {_got(value)}).")


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise fail(name, value, "True or False")
    return bool(value)


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """A whole number (Python or numpy, not bool, not float) in ``lo..hi`` (inclusive)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise fail(name, value, "a whole number")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
        raise ArgumentError(f"{name} must be {span} (got {value}).")
    return value


def optional_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int | None:
    return None if value is None else integer(name, value, lo, hi)


def text(name: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise fail(name, value, "a string" + (" or None" if optional else ""))
    return value


def path(name: str, value: Any, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise fail(name, value, "a path (str or pathlib.Path)" + (" or None" if optional else ""))
    return value


def choice(name: str, value: Any, choices: Sequence, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in choices:
        raise fail(name, value, "one of " + ", ".join(map(repr, choices)) + (" or None" if optional else ""))
    return value


def dtype(name: str, value: Any, allowed: Sequence[torch.dtype] = (torch.float32, torch.bfloat16, torch.float16),
          optional: bool = False) -> torch.dtype | None:
    """A ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.float16"``) among ``allowed``."""
    if value is None and optional:
        return None
    resolved = DTYPE_NAMES.get(value.removeprefix("torch.")) if isinstance(value, str) else value
    if not isinstance(resolved, torch.dtype) or resolved not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise fail(name, value, f"a dtype: one of {names} (as torch.bfloat16 or 'bfloat16')")
    return resolved


def device(name: str, value: Any, optional: bool = False) -> torch.device | None:
    """A device (``"cpu"``, ``"cuda:1"``, ``torch.device``) that this machine has."""
    if value is None and optional:
        return None
    if isinstance(value, torch.dtype) or (isinstance(value, str) and value.removeprefix("torch.") in DTYPE_NAMES):
        raise ArgumentError(f"{name} must be a device such as 'cpu' or 'cuda', not the dtype {value!r}; "
                            "pass dtypes as dtype=.")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise fail(name, value, "a device: 'cpu', 'cuda', 'cuda:1' or a torch.device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"{name}={value!r}: this torch has no usable CUDA device; pass 'cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ArgumentError(f"{name}={value!r}: there are only {torch.cuda.device_count()} CUDA devices.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise fail(name, value, "a cpu, cuda or mps device")
    return dev


def module(name: str, value: Any, optional: bool = False) -> torch.nn.Module | None:
    if value is None and optional:
        return None
    if not isinstance(value, torch.nn.Module):
        raise fail(name, value, "a loaded model (a torch.nn.Module, e.g. from lenses.load_model)"
                   + (" or None" if optional else ""))
    return value


def tensor(name: str, value: Any, *, min_dim: int = 1, last: int | None = None, floating: bool = True
           ) -> torch.Tensor:
    """A real tensor (not numpy, not on the meta device) of at least ``min_dim`` dimensions whose last
    dimension is ``last`` (when given), floating point if ``floating``."""
    if isinstance(value, np.ndarray):
        raise ArgumentError(f"{name} must be a torch tensor (got a numpy array of shape {value.shape}); "
                            "wrap it with torch.from_numpy(...).")
    if not isinstance(value, torch.Tensor):
        raise fail(name, value, "a torch tensor")
    if value.is_meta:
        raise ArgumentError(f"{name} is on the meta device and holds no numbers; compute it on a real device.")
    if floating and not value.is_floating_point():
        raise fail(name, value, "a floating-point tensor (hidden states)")
    if value.dim() < min_dim or (last is not None and value.shape[-1] != last):
        shape = "[..., " + (str(last) if last is not None else "d") + "]"
        raise fail(name, value, f"a tensor of shape {shape}")
    return value


def token_ids(name: str, value: Any, vocab: int | None = None, dims: int | None = None) -> torch.Tensor:
    """Token ids as a long tensor: ints in a list/tuple (nested for ``dims`` = 2), an integer numpy array or
    tensor; never floats (truncating them would read other tokens), each id in ``0..vocab-1``."""
    if isinstance(value, torch.Tensor):
        ids = value
    elif isinstance(value, (list, tuple)) and not value:
        ids = torch.zeros(0, dtype=torch.long)
    elif isinstance(value, np.ndarray) or (isinstance(value, (list, tuple))):
        try:
            ids = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            raise fail(name, value, "token ids: whole numbers in a list or tensor") from None
    else:
        raise fail(name, value, "token ids: whole numbers in a list or tensor")
    if ids.dtype not in INT_DTYPES:
        raise fail(name, value, "token ids: whole numbers (a float or bool is not a token id)")
    if dims is not None and ids.dim() != dims:
        raise fail(name, value, f"token ids of {dims} dimension{'s' if dims > 1 else ''}")
    ids = ids.long()
    if ids.numel() and vocab is not None:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ArgumentError(f"{name}: token id {bad} is outside the vocabulary (0..{vocab - 1}); ids come "
                                "from this model's tokenizer.")
    return ids


def positions(name: str, value: Any, length: int) -> list[int]:
    """Positions in an item of ``length`` tokens: ints, negative ones from the end; never wrapped around."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray, torch.Tensor)):
        raise fail(name, value, "a list of positions (whole numbers)")
    out = []
    for p in (value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else value):
        p = integer(name, p)
        if not -length <= p < length:
            raise ArgumentError(f"{name}: position {p} is outside an item of {length} tokens (positions "
                                f"{-length}..{length - 1}).")
        out.append(p % length)
    if len(set(out)) != len(out):
        raise ArgumentError(f"{name} lists a position twice: {list(value)}.")
    return out
