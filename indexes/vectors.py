"""The one door vectors enter an index through, the engine's one arg-max order, and approximate candidates.

Scores are inner products of L2-normalised rows (cosine similarities): higher = closer.
"""

from __future__ import annotations

import os
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


def read_rows(rows: np.ndarray, ids: np.ndarray | slice) -> np.ndarray:
    """rows[ids] (an id array, or a slice: a view where rows is held in memory). For a memory-mapped .npy
    file the rows are read, into a new array, with pread instead of through the mapping: every page a mapping
    faults in (and the kernel's fault-around and readahead beside it, 64 KB or more per row) stays in this
    process's RSS while the mapping lives, and a search that holds all T templates' mappings to fetch a few
    thousand candidate rows of each would otherwise keep a large share of every template's file resident.
    Rows stored in two halves (`indexes.split_rows.SplitRows`) are always read so."""
    take_rows = getattr(rows, "take_rows", None)
    if take_rows is not None:
        if isinstance(ids, slice):
            ids = np.arange(*ids.indices(len(rows)), dtype=np.int64)
        return take_rows(ids)
    name = getattr(rows, "filename", None)
    if not isinstance(rows, np.memmap) or not name or rows.ndim != 2 or not rows.flags.c_contiguous:
        return np.asarray(rows[ids])
    row_bytes = rows.shape[1] * rows.dtype.itemsize
    if rows.offset + len(rows) * row_bytes != os.path.getsize(name):  # a view into the mapping: offset is stale
        return np.asarray(rows[ids])
    if isinstance(ids, slice):
        ids = np.arange(*ids.indices(len(rows)), dtype=np.int64)
    return pread_rows(name, rows.offset, rows.dtype, rows.shape[1], ids)


def pread_rows(path: str | os.PathLike, offset: int, dtype: np.dtype, width: int, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (non-negative, any order) of the C-order array [N, width] of `dtype` that starts `offset`
    bytes into file `path`, read with pread into a new array; runs of consecutive ids are one read each."""
    ids = np.asarray(ids, np.int64)
    dtype = np.dtype(dtype)
    out = np.empty((len(ids), width), dtype)
    if not len(ids):
        return out
    row_bytes = width * dtype.itemsize
    starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 2) != 1)
    ends = np.append(starts[1:], len(ids))
    view = out.view(np.uint8).reshape(len(ids), row_bytes)
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        for a, b in zip(starts.tolist(), ends.tolist()):
            want = (b - a) * row_bytes
            got = os.preadv(fd, [memoryview(view[a:b]).cast("B")], offset + int(ids[a]) * row_bytes)
            if got != want:
                raise VectorFormatError(f"{path}: short read of rows {ids[a]}..{ids[b - 1]} ({got} of {want} bytes)")
    return out
