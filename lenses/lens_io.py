"""Lens files: our folder format for every lens class, and the `tuned-lens` package's format.

Ours: ``config.json`` (the lens ``kind``, its shapes, the model's fingerprint, how it was made)
and ``translators.safetensors`` (the lens's tensors by name). The `tuned-lens` package writes
``config.json`` + ``params.pt`` (the state dict of its ``layer_translators`` ModuleList: keys
``{i}.weight``/``{i}.bias``); we read it with ``weights_only=True`` and write it with
`export_tuned_lens`. Loading never runs code from a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptFileError, LensesError
from .io import atomic_write, write_json
from .jacobian import JacobianLens  # noqa: F401  (registers the "jacobian" kind)
from .lens import Lens, TunedLens
from .version import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "translators.safetensors"


def save_lens(lens: Lens, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``translators.safetensors`` then ``config.json`` (each atomically). A folder whose
    ``config.json`` lenses did not write (a model folder, another tool's file) is refused unless
    ``overwrite``: saving never replaces a file lenses did not make without being asked."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LensesError(f"{path} is a file; save a lens into a folder.")
    existing = path / CONFIG_NAME
    if existing.exists() and not overwrite:
        try:
            ours = "lenses_version" in json.loads(existing.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise LensesError(f"{path} already holds a {CONFIG_NAME} that lenses did not write (a model folder?); "
                              "nothing was changed. Save the lens into another folder, or pass overwrite=True to "
                              "replace it.")
    cast = getattr(lens, "save_dtypes", {})
    tensors = {k: v.detach().cpu().to(cast.get(k, v.dtype)).contiguous() for k, v in lens.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    config = {**lens.config, "lens": lens.kind, "num_layers": lens.num_layers, "d_model": lens.d_model,
              "lenses_version": __version__}
    write_json(path / CONFIG_NAME, config)
    return path


def load_lens(path: str | os.PathLike, model=None, strict: bool = True, device=None) -> Lens:
    """Load any lens: a folder (ours of any registered kind, or tuned-lens's), a Jacobian-lens file
    (published format or fit checkpoint, `lenses.jacobian`), a shipped lens's name or a hub id.

    With ``model`` (a HF model or `ModelAdapter`) the lens is attached and checked against it; a lens
    made for another model is refused (``strict=False`` relaxes the weight check only).
    """
    from .registry import resolve_lens_path

    path = resolve_lens_path(path)
    if path.is_file():
        from .jacobian import load_published

        lens = load_published(path, model, strict)
        _check_finite(lens, path)
        if model is not None:
            _note_unchecked(path, "a published Jacobian-lens file")
        return lens.to(device) if device is not None else lens
    config = read_config(path)
    if (path / WEIGHTS_NAME).exists():
        kind = config.get("lens", "tuned")
        if kind not in Lens.kinds:
            raise CorruptFileError(f"{path} holds a lens of kind {kind!r}, which this version of lenses does not "
                                   f"know (known: {sorted(Lens.kinds)}); upgrade lenses or re-train the lens.")
        tensors = _read_safetensors(path / WEIGHTS_NAME)
    elif (path / "params.pt").exists():
        kind, tensors = "tuned", _read_tuned_lens_package(path / "params.pt", config)
        config = {"model": config.get("base_model_name_or_path", ""), "imported_from": "tuned-lens"}
    else:
        raise CorruptFileError(f"{path} has no {WEIGHTS_NAME} (nor a tuned-lens params.pt): is this a lens folder "
                               "written by train_probes.py? Re-train or re-copy it.")
    lens = _build(Lens.kinds[kind], path, config, tensors)
    _check_finite(lens, path)
    if model is not None:
        if not isinstance(config.get("fingerprint"), dict):
            _note_unchecked(path, "a tuned-lens package lens" if "imported_from" in config else "a lens folder")
        lens.attach(model, strict=strict)
        device = device or lens.adapter.device
    return lens.to(device) if device is not None else lens


def _note_unchecked(path: Path, what: str) -> None:
    """One line saying that a lens could not be checked against the model's weights."""
    import sys

    print(f"note: {path} ({what}) carries no model fingerprint, so only its shapes were checked against this "
          "model; make sure it was made for it.", file=sys.stderr)


def _check_finite(lens: Lens, path: Path) -> None:
    """Refuse a lens holding NaN or infinite values (they would silently poison every reading)."""
    for name, t in lens.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CorruptFileError(f"{path}: tensor {name!r} holds {bad} NaN or infinite values; the lens is "
                                   "damaged (or was trained with a diverging loss). Re-train or re-copy it.")


def _build(cls: type[Lens], path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Lens:
    first = next(iter(tensors.values()), None)
    shape = (first.shape[0], first.shape[-1]) if first is not None and first.dim() >= 2 else (0, 0)
    try:
        num_layers, d_model = int(config.get("num_layers", shape[0])), int(config.get("d_model", shape[1]))
        lens = cls(num_layers, d_model, config=config)
        own = lens.state_dict()
        for name, t in tensors.items():
            if name in own and own[name].shape != t.shape:
                raise ValueError(f"tensor {name!r} is {tuple(t.shape)}, expected {tuple(own[name].shape)}")
        lens.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in tensors.items()})
    except (RuntimeError, ValueError, TypeError) as e:
        raise CorruptFileError(f"{path}: the lens files do not fit together ({str(e).splitlines()[0][:300]}); "
                               "the folder is inconsistent. Re-train or re-copy it.") from e
    return lens


def export_tuned_lens(lens: TunedLens, path: str | os.PathLike) -> Path:
    """Write ``lens`` in the `tuned-lens` package's format (``config.json`` + ``params.pt``)."""
    path = Path(path)
    params = {}
    for i in range(lens.num_layers):
        params[f"{i}.weight"] = lens.weight[i].detach().cpu().clone()
        params[f"{i}.bias"] = lens.bias[i].detach().cpu().clone()
    atomic_write(path / "params.pt", lambda tmp: torch.save(params, tmp))
    write_json(path / CONFIG_NAME, {
        "base_model_name_or_path": lens.config.get("model", ""), "d_model": lens.d_model,
        "num_hidden_layers": lens.num_layers, "bias": True, "base_model_revision": None,
        "lens_type": "linear_tuned_lens",
    })
    return path


# --------------------------------------------------------------------------- readers


def read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_NAME
    if not file.exists():
        raise LensesError(f"{path} is not a lens folder (no {CONFIG_NAME}). Pass the --out folder of train_probes.py.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{file} is not valid JSON ({e}); the lens folder is damaged: re-train or re-copy "
                               "it.") from e
    if not isinstance(config, dict):
        raise CorruptFileError(f"{file} holds a JSON {type(config).__name__}, not an object; it is not a lens config.")
    return config


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
    except Exception as e:  # safetensors raises several types for truncation/corruption
        raise CorruptFileError(
            f"{file} is truncated or corrupt ({type(e).__name__}: {e}). Re-train, resume from the last "
            "checkpoint (train_probes.py --resume), or re-copy the file."
        ) from e


def _read_tuned_lens_package(file: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map the tuned-lens package's translator keys (``{i}.weight``, or ``layer_translators.{i}.weight``)
    to our stacked ``weight`` [L, d, d] and ``bias`` [L, d]."""
    try:
        params = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptFileError(f"{file} could not be read ({type(e).__name__}: {e}); re-copy the lens.") from e
    if not isinstance(params, dict):
        raise CorruptFileError(f"{file} holds a {type(params).__name__}, not a state dict; it is not a tuned-lens "
                               "lens.")
    params = {str(k).removeprefix("layer_translators."): v for k, v in params.items()}
    indices = [int(k.split(".")[0]) for k in params if k.split(".")[0].isdigit()]
    if not indices:
        raise CorruptFileError(f"{file} holds no translators (keys {sorted(params)[:4]}); it is not a tuned-lens lens.")
    n = config.get("num_hidden_layers") if isinstance(config.get("num_hidden_layers"), int) else 0
    n = n or 1 + max(indices)
    try:
        weight = torch.stack([params[f"{i}.weight"].float() for i in range(n)])
        bias = torch.stack([params.get(f"{i}.bias", torch.zeros(weight.shape[1])).float() for i in range(n)])
    except KeyError as e:
        raise CorruptFileError(f"{file} lacks translator {e}; it is not a complete tuned-lens lens.") from e
    except (RuntimeError, AttributeError, IndexError) as e:
        raise CorruptFileError(f"{file}: translators of different shapes ({e}); the lens is damaged.") from e
    if weight.dim() != 3 or weight.shape[1] != weight.shape[2]:
        raise CorruptFileError(f"{file}: translator weights are {tuple(weight.shape)}, not square; not a tuned lens.")
    return {"weight": weight, "bias": bias}
