"""One exception family, so callers (and the CLIs) can catch our errors and print them cleanly.

Every message names the problem *and* the fix: a researcher should never need the traceback.
"""


class LensesError(Exception):
    """Base class: the CLIs print these without a traceback and exit with status 2."""


class ModelStructureError(LensesError):
    """The adapter could not find a model part (decoder layers, final norm, unembedding)."""


class LensMismatchError(LensesError):
    """A lens was trained for another model (shape or fingerprint differs)."""


class CorruptFileError(LensesError):
    """A lens or checkpoint file is truncated, corrupt, or not what its name says."""


class DataError(LensesError):
    """Input data is empty, too short, unreadable, or malformed."""
