"""What a faiss index is made of: which certificate its structure allows, and the layers inside it.

Also the faiss call-site helpers every faiss module shares: building from a factory string, one-line error
messages, and the clean-up of faiss's padding of missing results.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any

import faiss
import numpy as np

from .errors import IndexSpecError

_IVF_CODES = {"IndexIVFFlat", "IndexIVFScalarQuantizer", "IndexIVFPQ"}
_FLAT_CODES = {"IndexFlat", "IndexScalarQuantizer", "IndexPQ"}


class Structure(str, Enum):
    """What the certificate can rely on."""

    IVF = "ivf"  # inverted lists with decodable codes: per-list bounds
    CODES = "codes"  # every row scored from a decodable code
    OPAQUE = "opaque"  # no bound (HNSW graphs, fast-scan, chains): certificates are +inf


def faiss_message(e: Exception) -> str:
    """The useful last part of a faiss RuntimeError ("Error in ... at file.cpp:123: Error: '...' failed: X")."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = re.sub(r"^Error in .*? at \S+:\d+: ", "", msg)
    msg = re.sub(r"^Error: '.*?' failed:? ?", "", msg)
    return msg or str(e).splitlines()[0]


def build_cpu_index(factory: str, dim: int) -> faiss.Index:
    if not isinstance(factory, str) or not factory.strip():
        raise IndexSpecError(f"faiss factory string must be a non-empty string, got {factory!r}")
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except (RuntimeError, AssertionError) as e:  # faiss: RuntimeError with a C++ trace; swig: AssertionError
        raise IndexSpecError(f"faiss factory string {factory!r} cannot build an index of dimension {dim}: "
                             f"{faiss_message(e)}") from None


def type_name(index: faiss.Index) -> str:
    name = type(index).__name__
    return "IndexFlat" if name in ("IndexFlatIP", "IndexFlatL2") else name  # read_index gives the subclass


def structure_of(index: faiss.Index) -> Structure:
    name = type_name(index)
    if name in _IVF_CODES and index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return Structure.IVF
    if name in _FLAT_CODES and index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return Structure.CODES
    return Structure.OPAQUE


def is_hnsw(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexHNSW)


def find_ivf(index: faiss.Index) -> Any:
    """The IndexIVF inside `index` (itself, or under a pre-transform), or None."""
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # faiss raises when there is none
        return None


def find_hnsw(index: faiss.Index) -> Any:
    """The HNSW index inside (itself, or under pre-transform / refine layers), or None."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexPreTransform, faiss.IndexRefine)):
        index = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform)
                                     else index.base_index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def listnos(codes: np.ndarray, nbytes: int) -> np.ndarray:
    """List numbers of IVF standalone codes: the first `nbytes` bytes, little-endian (faiss encode_listno)."""
    out = np.zeros(len(codes), np.int64)
    for b in range(nbytes):
        out |= codes[:, b].astype(np.int64) << (8 * b)
    return out


def clean(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss pads missing results with id -1 and score -FLT_MAX (inner product): make those -inf."""
    ids = ids.astype(np.int64, copy=False)
    scores = np.where(ids < 0, np.float32(-np.inf), scores).astype(np.float32, copy=False)
    return scores, ids
