"""The paper's method as a backend: a dense similarity matrix and a top-k over all names (torch).

It is the baseline every benchmark measures against, and an independent exact path for tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .base import IndexData, NameIndexBackend, template_file
from .matmul import float32_matmul
from .registry import register_backend
from .vectors import as_vectors, reject_search_params, sort_topk

_WHAT = "the dense baseline"  # names it in the refusal of search parameters

# Rows of the [queries x names] score matrix computed at once: bounds memory to ~256 MB of scores.
_SCORE_BUDGET = 64 * 1024 * 1024


@register_backend
class DenseTorchBackend(NameIndexBackend):
    kind: ClassVar[str] = "dense"
    file_suffix: ClassVar[str] = ".npy"
    # Scores are float32 dot products of the stored rows (TF32 held off during search: `float32_matmul`).
    exact_search: ClassVar[bool] = True

    def __init__(self, dim: int, device: torch.device):
        self._dim = dim
        self._device = device
        self._chunks: list[torch.Tensor] = []
        self._matrix: torch.Tensor | None = None

    @classmethod
    def create(cls, dim: int, *, use_gpu: bool = False,
               search_params: Mapping[str, Any] | None = None) -> DenseTorchBackend:
        reject_search_params(_WHAT, search_params)
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        return cls(dim, device)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def on_gpu(self) -> bool:
        return self._device.type == "cuda"

    def _names(self) -> torch.Tensor:
        if self._matrix is None:
            self._matrix = (torch.cat(self._chunks) if self._chunks
                            else torch.zeros((0, self._dim), device=self._device))
            self._chunks = [self._matrix]
        return self._matrix

    @property
    def ntotal(self) -> int:
        return int(sum(len(c) for c in self._chunks))

    def add(self, vectors: np.ndarray) -> None:
        # torch.tensor copies: later changes to the caller's array must not change the index.
        self._chunks.append(torch.tensor(as_vectors(vectors, self._dim, what="name embeddings"), device=self._device))
        self._matrix = None

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        reject_search_params(_WHAT, params)
        q = torch.from_numpy(as_vectors(queries, self._dim, what="queries")).to(self._device)
        names = self._names()
        k = min(int(k), len(names))
        out_s = np.zeros((len(q), max(k, 0)), np.float32)
        out_i = np.zeros((len(q), max(k, 0)), np.int64)
        if k < 1:
            return out_s, out_i
        step = max(1, _SCORE_BUDGET // max(1, len(names)))
        for start in range(0, len(q), step):
            with float32_matmul():
                sims = q[start:start + step] @ names.T
            top_s, top_i = torch.topk(sims, k, dim=1)
            # torch.topk picks an arbitrary member of a tie at the k-th place; the engine's convention is
            # the lowest id, so rows with more than k names at or above the k-th score are redone exactly.
            tied_rows = ((sims >= top_s[:, -1:]).sum(1) > k).nonzero().flatten().tolist()
            s, i = top_s.cpu().numpy(), top_i.cpu().numpy()
            for r in tied_rows:
                ids = torch.nonzero(sims[r] >= float(s[r, -1])).flatten().cpu().numpy()
                row_s, row_i = sort_topk(sims[r, ids].cpu().numpy()[None], ids[None].astype(np.int64))
                s[r], i[r] = row_s[0, :k], row_i[0, :k]
            out_s[start:start + step] = s
            out_i[start:start + step] = i
        return sort_topk(out_s, out_i)

    def save(self, path: Path) -> None:
        np.save(path, self._names().cpu().numpy())

    @classmethod
    def stored_rows(cls, index: IndexData, t: int) -> np.ndarray:
        """The matrix of template t, memory-mapped from the file the dense baseline saves it in."""
        return np.load(index.data_dir / template_file(t, cls.file_suffix), mmap_mode="r")

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool = False) -> DenseTorchBackend:
        matrix = np.load(path)
        backend = cls.create(matrix.shape[1], use_gpu=use_gpu)
        backend.add(matrix)
        return backend
