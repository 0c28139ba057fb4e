"""Exact inner-product search with FAISS `IndexFlatIP`, on the CPU or, when faiss sees one, the GPU."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np

# gpu.faiss_gpu_count is looked up at call time, so tests can patch it in one place.
from . import gpu as _gpu
from .base import IndexData, NameIndexBackend
from .errors import VectorFormatError
from .registry import register_backend
from .vectors import as_vectors, empty_topk, reject_search_params, sort_topk

_WHAT = "the flat index"  # names it in the refusal of search parameters


@register_backend
class FlatIPBackend(NameIndexBackend):
    """Brute-force exact search; the default backend."""

    kind: ClassVar[str] = "flat"
    file_suffix: ClassVar[str] = ".faiss"
    exact_search: ClassVar[bool] = True  # scores are float32 dot products of the stored rows (no codes)

    def __init__(self, index: faiss.Index, on_gpu: bool):
        self._index = index
        self._on_gpu = on_gpu

    @classmethod
    def create(cls, dim: int, *, use_gpu: bool = False,
               search_params: Mapping[str, Any] | None = None) -> FlatIPBackend:
        reject_search_params(_WHAT, search_params)
        return cls(*_gpu.replicate_to_gpus(faiss.IndexFlatIP(dim), use_gpu))

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def on_gpu(self) -> bool:
        return self._on_gpu

    def add(self, vectors: np.ndarray) -> None:
        self._index.add(as_vectors(vectors, self.dim, what="name embeddings"))

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        reject_search_params(_WHAT, params)
        q = as_vectors(queries, self.dim, what="queries")
        k = min(int(k), self.ntotal)
        if k < 1:
            return empty_topk(len(q), 0)
        scores, ids = self._index.search(q, k)
        return sort_topk(scores, ids.astype(np.int64, copy=False))

    @classmethod
    def stored_rows(cls, index: IndexData, t: int) -> np.ndarray:
        """The rows of template t's IndexFlatIP, copied out of it: a flat index stores them verbatim (float32)."""
        backend = index.load_template(t)
        return backend._index.reconstruct_n(0, backend.ntotal)

    def save(self, path: Path) -> None:
        index = faiss.index_gpu_to_cpu(self._index) if self._on_gpu else self._index
        faiss.write_index(index, str(path))

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool = False) -> FlatIPBackend:
        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexFlatIP):
            raise VectorFormatError(f"{path} holds a {type(index).__name__}, not an IndexFlatIP")
        return cls(*_gpu.replicate_to_gpus(index, use_gpu))
