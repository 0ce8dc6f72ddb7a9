"""lenses: see what a transformer language model predicts at every layer.

Quick start::

    from lenses import load_model, LogitLens, TunedLens
    model, tok = load_model()                      # default: SmolLM2-135M-Instruct
    lens = TunedLens.from_pretrained("runs/demo", model=model)
"""

__version__ = "0.1.0"

from .errors import CorruptFileError, DataError, LensesError, LensMismatchError, ModelStructureError  # noqa: E402
from .lens import LogitLens, TunedLens  # noqa: E402
from .models import DEFAULT_MODEL, ModelAdapter, load_model  # noqa: E402

__all__ = [
    "__version__",
    "load_model",
    "ModelAdapter",
    "LogitLens",
    "TunedLens",
    "DEFAULT_MODEL",
    "LensesError",
    "ModelStructureError",
    "LensMismatchError",
    "CorruptFileError",
    "DataError",
]
