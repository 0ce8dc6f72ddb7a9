"""lenses: see what a transformer language model predicts at every layer.

Quick start::

    from lenses import load_model, load_lens, LogitLens
    model, tok = load_model()                      # default: SmolLM2-135M-Instruct
    lens = load_lens("smollm2-135m-instruct", model)   # the shipped tuned lens; or a run folder
"""

from lenses.base.errors import CorruptFileError, DataError, LensesError, LensMismatchError, ModelStructureError
from lenses.base.version import __version__
from lenses.kinds.jacobian import JacobianLens
from lenses.kinds.lens import Lens, LogitLens, TunedLens
from lenses.kinds.load import load_lens, register_kind, save_lens
from lenses.model.adapter import ModelAdapter
from lenses.model.loading import DEFAULT_MODEL, load_model
from lenses.text import convention

__all__ = [
    "__version__",
    "load_model",
    "load_lens",
    "save_lens",
    "register_kind",
    "ModelAdapter",
    "Lens",
    "LogitLens",
    "TunedLens",
    "JacobianLens",
    "DEFAULT_MODEL",
    "LensesError",
    "ModelStructureError",
    "LensMismatchError",
    "CorruptFileError",
    "DataError",
    "convention",
]
