"""lenses: see what a transformer language model predicts at every layer.

Quick start::

    from lenses import load_model, load_lens, LogitLens
    model, tok = load_model()                      # default: SmolLM2-135M-Instruct
    lens = load_lens("smollm2-135m-instruct", model)   # the shipped tuned lens; or a run folder
"""

from . import convention
from .errors import CorruptFileError, DataError, LensesError, LensMismatchError, ModelStructureError
from .jacobian import JacobianLens
from .lens import Lens, LogitLens, TunedLens
from .lens_io import load_lens, register_kind, save_lens
from .loading import DEFAULT_MODEL, load_model
from .models import ModelAdapter
from .version import __version__

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
