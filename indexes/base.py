"""The one small interface every name-index backend implements, and the one door vectors enter through.

A backend holds the L2-normalised text embeddings of one prompt template (one row per candidate name)
and answers top-k maximum-inner-product queries. Scores are cosine similarities: higher = closer.
Search parameters (nprobe, efSearch, ...) travel with each call; they are never set on a shared index.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
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


def as_vectors(x: Any, dim: int | None = None, *, what: str = "vectors") -> np.ndarray:
    """The only way vectors enter an index: a C-contiguous float32 array of shape [n, dim], finite."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise VectorFormatError(f"{what} must be a 2-D array [n, dim], got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise VectorFormatError(f"{what} have dimension {arr.shape[1]}, the index holds dimension {dim}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise VectorFormatError(f"{what} must be floating point, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise VectorFormatError(f"{what} contain NaN or infinite values")
    return arr


def sort_topk(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by score descending, ties by id ascending: the engine's one arg-max convention."""
    order = np.lexsort((ids, -scores), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


@dataclass(frozen=True)
class Candidates:
    """An approximate top-k' and a certificate for every row it left out (see `indexes.exact`)."""

    scores: np.ndarray  # float32 [Q, k'] approximate (code-based) scores, -inf where fewer than k' were found
    ids: np.ndarray  # int64 [Q, k'] row ids, -1 where fewer than k' were found
    bound: np.ndarray  # float64 [Q]: every row NOT in `ids` has exact score q.x <= bound (-inf: none left out;
    #                    +inf: nothing is known)


@runtime_checkable
class NameIndexBackend(Protocol):
    """Top-k inner-product search over the embeddings of one template."""

    kind: ClassVar[str]  # registry key, recorded in the index manifest
    file_suffix: ClassVar[str]  # suffix of the file `save` writes

    @property
    def dim(self) -> int: ...

    @property
    def ntotal(self) -> int: ...

    @classmethod
    def create(cls, dim: int, *, use_gpu: bool = False) -> NameIndexBackend: ...

    def add(self, vectors: np.ndarray) -> None:
        """Append rows; row ids continue from `ntotal`."""

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Queries [Q, dim] -> (scores float32 [Q, k'], ids int64 [Q, k']), k' = min(k, ntotal),
        each row ordered by `sort_topk`."""

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool = False) -> NameIndexBackend: ...
