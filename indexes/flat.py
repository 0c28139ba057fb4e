"""Exact inner-product search with FAISS `IndexFlatIP`, on the CPU or, when faiss sees one, the GPU."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np

from .base import VectorFormatError, as_vectors, sort_topk
from .registry import register_backend

log = logging.getLogger(__name__)


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for CPU-only builds or machines without a GPU)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def _to_gpu(index: faiss.Index, use_gpu: bool) -> tuple[faiss.Index, bool]:
    """Replicate `index` on all GPUs if asked and possible; otherwise keep it on the CPU (with a log line)."""
    if not use_gpu:
        return index, False
    if faiss_gpu_count() == 0:
        log.warning("GPU search asked for, but faiss sees no GPU: searching on the CPU")
        return index, False
    return faiss.index_cpu_to_all_gpus(index), True


@register_backend
class FlatIPBackend:
    """Brute-force exact search; the default backend."""

    kind: ClassVar[str] = "flat"
    file_suffix: ClassVar[str] = ".faiss"
    exact_search: ClassVar[bool] = True  # scores are float32 dot products of the stored rows (no codes)

    def __init__(self, index: faiss.Index, on_gpu: bool):
        self._index = index
        self.on_gpu = on_gpu

    @classmethod
    def create(cls, dim: int, *, use_gpu: bool = False) -> FlatIPBackend:
        return cls(*_to_gpu(faiss.IndexFlatIP(dim), use_gpu))

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        self._index.add(as_vectors(vectors, self.dim, what="name embeddings"))

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        if params:
            raise VectorFormatError(f"the flat index takes no search parameters, got {sorted(params)}")
        q = as_vectors(queries, self.dim, what="queries")
        k = min(int(k), self.ntotal)
        if k < 1:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        scores, ids = self._index.search(q, k)
        return sort_topk(scores, ids.astype(np.int64, copy=False))

    def save(self, path: Path) -> None:
        index = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
        faiss.write_index(index, str(path))

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool = False) -> FlatIPBackend:
        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexFlatIP):
            raise VectorFormatError(f"{path} holds a {type(index).__name__}, not an IndexFlatIP")
        return cls(*_to_gpu(index, use_gpu))
