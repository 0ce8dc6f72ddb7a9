"""One exception family, so callers (and the CLIs) can catch our errors and print them cleanly.

Every message names the problem *and* the fix: a researcher should never need the traceback.
"""


class LensesError(Exception):
    """Base class: the CLIs print these without a traceback and exit with status 2."""


class ModelStructureError(LensesError):
    """The adapter could not find a model part (decoder layers, final norm, unembedding)."""


class UnsupportedModelError(ModelStructureError):
    """The model has no residual stream a lens can read layer by layer (not causal, looped blocks, a
    transform between the last block and the unembedding that we cannot name, ...); the message says why."""


class LensMismatchError(LensesError):
    """A lens was trained for another model (shape or fingerprint differs)."""


class CorruptFileError(LensesError):
    """A lens or checkpoint file is truncated, corrupt, or not what its name says."""


class DataError(LensesError):
    """Input data is empty, too short, unreadable, or malformed."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """``e``'s message cut to its first line and ``limit`` characters ('' for an exception without one), to
    quote inside one of our one-line errors."""
    return (str(e).splitlines() or [""])[0][:limit]
