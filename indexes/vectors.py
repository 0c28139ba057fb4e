"""The one door vectors enter an index through, the engine's one arg-max order, and approximate candidates.

Scores are inner products of L2-normalised rows (cosine similarities): higher = closer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import VectorFormatError


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


def reject_search_params(what: str, params: Mapping[str, Any] | None) -> None:
    """Indexes without search parameters (flat, dense) refuse any, at creation and per call."""
    if params:
        raise VectorFormatError(f"{what} takes no search parameters, got {sorted(params)}")


def sort_topk(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by score descending, ties by id ascending: the engine's one arg-max convention."""
    order = np.lexsort((ids, -scores), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def empty_topk(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The answer with k columns and nothing in them: (scores float32 [nq, k], ids int64 [nq, k]), zeros."""
    return np.zeros((nq, max(k, 0)), np.float32), np.zeros((nq, max(k, 0)), np.int64)


@dataclass(frozen=True)
class Candidates:
    """An approximate top-k' and a certificate for every row it left out (see `indexes.exact`)."""

    scores: np.ndarray  # float32 [Q, k'] approximate (code-based) scores, -inf where fewer than k' were found
    ids: np.ndarray  # int64 [Q, k'] row ids, -1 where fewer than k' were found
    bound: np.ndarray  # float64 [Q]: every row NOT in `ids` has exact score q.x <= bound (-inf: none left out;
    #                    +inf: nothing is known)
