"""Lens folders on disk, for every lens kind: reading and writing them, without knowing the classes.

Ours: ``config.json`` (the lens ``kind``, its shapes, the model's fingerprint, how it was made) and
``translators.safetensors`` (the lens's tensors by name). The `tuned-lens` package writes
``config.json`` + ``params.pt`` (the state dict of its ``layer_translators`` ModuleList: keys
``{i}.weight``/``{i}.bias``), read here as our ``weight`` [L, d, d] and ``bias`` [L, d] with
``weights_only=True``. Loading never runs code from a file. The classes build themselves from what
`read_folder` returns (`lenses.kinds.lens.Lens.from_pretrained`); `lenses.kinds.load.load_lens` picks the class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lenses.base import schema
from lenses.base.errors import CorruptFileError, LensesError
from lenses.base.io import atomic_write, write_json
from lenses.base.outdir import check_target
from lenses.base.version import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "translators.safetensors"


def read_folder(path: Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(kind, config, tensors)`` of a lens folder: ours (any kind) or the tuned-lens package's."""
    config = read_config(path)
    if (path / WEIGHTS_NAME).exists():
        kind = config.get("lens", "tuned")
        if not isinstance(kind, str):
            raise CorruptFileError(f"{path / CONFIG_NAME}: its 'lens' field is {kind!r}, not a lens kind name.")
        return kind, config, read_tensors(path / WEIGHTS_NAME)
    if (path / "params.pt").exists():
        tensors = _read_tuned_lens_package(path / "params.pt", config)
        return "tuned", {"model": config.get("base_model_name_or_path", ""), "imported_from": "tuned-lens"}, tensors
    raise CorruptFileError(f"{path} has no {WEIGHTS_NAME} (nor a tuned-lens params.pt): is this a lens folder "
                           "written by lenses train? Re-train or re-copy it.")


def write_folder(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                 overwrite: bool = False) -> Path:
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
    if (path / WEIGHTS_NAME).exists() and not (path / CONFIG_NAME).exists():
        check_target(path / WEIGHTS_NAME, overwrite, "the lens file")  # a weights file without our config
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    write_json(path / CONFIG_NAME, {**config, "lenses_version": __version__})
    return path


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a lens holding NaN or infinite values (they would silently poison every reading)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CorruptFileError(f"{path}: tensor {name!r} holds {bad} NaN or infinite values; the lens is "
                                   "damaged (or was trained with a diverging loss). Re-train or re-copy it.")


def note_unchecked(path: Path, what: str) -> None:
    """One line saying that a lens could not be checked against the model's weights."""
    import sys

    print(f"note: {path} ({what}) carries no model fingerprint, so only its shapes were checked against this "
          "model; make sure it was made for it.", file=sys.stderr)


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
    return schema.check(config, schema.LENS_CONFIG, str(file), schema.LENS_CONFIG_EXAMPLE, error=CorruptFileError)


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
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
