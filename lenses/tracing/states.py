"""Hidden states that another engine captured, decoded by our lenses (``lenses analyze --states``).

The format (docs/analysis.md, "States captured elsewhere"): per token sequence, its ``input_ids`` [T], its
``hidden_states`` [n, T, d] (a leading batch dimension of 1 is dropped) and the ``logits`` [T, V] the model
gave. A safetensors file holds one sequence under those names or several as ``hidden_states.K`` ... ``.K``; a
folder holds such files; a ``.pt`` file (or, in Python, the object itself) holds nnsight's saved values as a
dictionary: ``input_ids``, ``logits``, and the states under integer keys (``layers[i].output``: block ``i``'s
output) with, optionally, ``embeddings`` (or a list of such dictionaries).

The layer numbering is checked, not assumed (`Captured.check`):

1. ``n == L + 1``: layers 0..L; layer 0 must be the embeddings of the ids (else the states are shifted);
   ``n == L``: block outputs, layers 1..L, and layer 0 is the embeddings (computed here); any other ``n``
   is refused.
2. The last state, decoded (final norm, unembedding), must reproduce the stored logits: the residual stream
   before the final norm (our convention, nnsight's last block output). If instead the unembedding alone
   reproduces them, the last state is after the final norm (transformers' ``output_hidden_states``): it is
   mapped back through the norm's measured affine form (`lenses.model.norm_affine`), and the job says so.
   Neither: refused (another model, or shifted layers).

Within `reading(captured)`, every `lenses.tracing.trace.trace` takes each text's states from ``captured`` (a
text's ids must start one of the captured sequences: a causal model's states there do not depend on what
follows) instead of running the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lenses.base.errors import LensesError
from lenses.model.discovery import max_positions

Loader = Callable[[], torch.Tensor]


@dataclass
class Sequence:
    """One captured token sequence: its ids, and loaders of its states and logits (read when used)."""

    ids: tuple[int, ...]
    states: Loader
    logits: Loader | None
    where: str


def _squeeze(t: torch.Tensor, dims: int, what: str) -> torch.Tensor:
    while t.dim() > dims and t.shape[-dims - 1] == 1:  # a batch dimension of one
        t = t.squeeze(-dims - 1)
    if t.dim() != dims:
        raise LensesError(f"{what} has shape {tuple(t.shape)}, expected {dims} dimensions; see the --states format "
                          "in docs/analysis.md.")
    return t


def _from_safetensors(file: Path) -> list[Sequence]:
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as f:
            keys = set(f.keys())
    except Exception as e:  # safetensors raises its own types for files it cannot parse
        raise LensesError(f"--states {file} is not a readable safetensors file ({type(e).__name__}: "
                          f"{str(e)[:80]}); write it with safetensors' save_file.") from e
    suffixes = sorted({k[len("hidden_states"):] for k in keys if k.startswith("hidden_states")})
    if not suffixes:
        raise LensesError(f"{file} holds no 'hidden_states' tensor; see the --states format in docs/analysis.md.")

    def load(name: str) -> Loader:
        def get() -> torch.Tensor:
            with safe_open(file, "pt") as f:
                return f.get_tensor(name)
        return get

    out = []
    for s in suffixes:
        if f"input_ids{s}" not in keys:
            raise LensesError(f"{file} holds hidden_states{s} but no input_ids{s}: store the token ids beside the "
                              "states.")
        ids = _squeeze(load(f"input_ids{s}")(), 1, f"{file}: input_ids{s}")
        out.append(Sequence(tuple(int(i) for i in ids), load(f"hidden_states{s}"),
                            load(f"logits{s}") if f"logits{s}" in keys else None, f"{file} (hidden_states{s})"))
    return out


def _from_dict(d: dict, where: str) -> Sequence:
    """nnsight's saved values (see the module docstring)."""
    if "input_ids" not in d:
        raise LensesError(f"{where}: the dictionary has no 'input_ids'; save the token ids beside the states.")
    layers = sorted(k for k in d if isinstance(k, int) or (isinstance(k, str) and k.isdigit()))
    if not layers:
        raise LensesError(f"{where}: the dictionary has no states under integer keys (layers[i].output); see the "
                          "--states format in docs/analysis.md.")
    tensors = ([d["embeddings"]] if "embeddings" in d else []) + [d[k] for k in sorted(layers, key=int)]
    tensors = [_squeeze(torch.as_tensor(t[0] if isinstance(t, (tuple, list)) else t), 2, f"{where}: a state")
               for t in tensors]
    states = torch.stack(tensors)
    logits = d.get("logits")
    logits = None if logits is None else torch.as_tensor(logits)
    ids = _squeeze(torch.as_tensor(d["input_ids"]), 1, f"{where}: input_ids")
    return Sequence(tuple(int(i) for i in ids), lambda: states, None if logits is None else (lambda: logits), where)


def read(source) -> list[Sequence]:
    """The sequences of ``source``: a safetensors or .pt file, a folder of them, a dict or a list of dicts."""
    if isinstance(source, dict):
        return [_from_dict(source, "the states")]
    if isinstance(source, (list, tuple)) and all(isinstance(d, dict) for d in source):
        return [_from_dict(d, f"the states [{k}]") for k, d in enumerate(source)]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pt"))
        if not files:
            raise LensesError(f"--states {path} holds no .safetensors or .pt file; see the format in "
                              "docs/analysis.md.")
        return [s for f in files for s in read(f)]
    if not path.is_file():
        raise LensesError(f"--states {path} does not exist; give a safetensors file, a .pt file or a folder of them.")
    if path.suffix == ".safetensors":
        return _from_safetensors(path)
    if path.suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for files it cannot read
            raise LensesError(f"--states {path} could not be read as saved tensors ({type(e).__name__}); save "
                              "nnsight's values with torch.save(dict, path).") from e
        return read(obj if isinstance(obj, (dict, list, tuple)) else {})
    raise LensesError(f"--states {path}: expected a .safetensors or .pt file, or a folder of them.")


def embeddings(adapter, ids: torch.Tensor) -> torch.Tensor:
    """Layer 0 of ``ids``: the model's input embedding module (with its own scale), plus a learned absolute
    position embedding where the model has one (GPT-2's)."""
    model = adapter.model
    table = model.get_input_embeddings()
    out = table(ids.to(adapter.device)).float()
    width = max_positions(getattr(model, "config", None))
    extra = [m for m in model.modules() if isinstance(m, nn.Embedding) and m is not table
             and m.num_embeddings == width and m.weight.device.type != "meta"]
    if len(extra) == 1:
        out = out + extra[0](torch.arange(len(ids), device=adapter.device)).float()
    return out


_current: list = [None]


@contextmanager
def reading(captured):
    """Within this block every trace reads its texts' states from ``captured`` (a `Captured`)."""
    old, _current[0] = _current[0], captured
    try:
        yield captured
    finally:
        _current[0] = old


def current():
    return _current[0]
