"""The errors of the indexes package (all `IdiaError`s, so the command line reports them in one line)."""

from __future__ import annotations

from idia_engine.engine.errors import IdiaError


class VectorFormatError(IdiaError):
    """Vectors handed to an index are not a finite float32 matrix of the index's dimension."""


class UnknownBackendError(IdiaError):
    """An index kind that no backend is registered for."""

    exit_code = 2


class IndexSpecError(UnknownBackendError):
    """A faiss factory string (or index description) that cannot build an index of the asked dimension,
    or a memory budget no index fits in."""


class SearchParamsError(VectorFormatError):
    """Search parameters an index cannot use (an unknown key, a value out of range).

    A subclass of VectorFormatError because the exact backends have always rejected parameters with it."""


class IndexNotTrainedError(IdiaError):
    """Rows were added to (or searched in) an index that needs `train(sample)` first."""


class IndexFileError(IdiaError):
    """An index file (or its sidecar) is missing, of another index type, or inconsistent with itself."""
