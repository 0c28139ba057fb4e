"""A full scan in bfloat16 with a rigorous error bound: exact answers at reduced-precision speed.

`--index bf16` keeps each template's rows rounded to bfloat16 (half of float32's bytes) and scans them with
torch's bf16 matmul, which CPUs with AMX or AVX-512 BF16 run several times faster than a float32 scan
(on a 2-core Xeon with AMX: 38 ms against 136 ms for 300 queries x 10^5 x 512). It is an approximate kind:
its top-k' are candidates, re-scored exactly against the raw float32 rows kept beside it, and the top-1 is
certified by a bound on every row it left out (`indexes.exact`); what the bound cannot certify is answered
by brute force, so answers are exact either way.

The bound. For a float32 query q and row x, with q^ and x^ their bf16 roundings, the scan computes
c = q^.x^ accumulated in float32 (every product of two bf16 numbers is exact in float32), then rounds c to
bf16: s^. Then, for the real score s = q.x,

    |s - q^.x^|  <= ||q - q^|| max||x|| + ||q^|| max||x - x^||          (rounding of query and rows)
    |q^.x^ - c|  <= gamma_D ||q^|| max||x^||                            (float32 accumulation, any order)
    |c - s^|     <= 2^-7 |c|,  so  c <= s^ + 2^-7 |s^| / (1 - 2^-7)       (bf16 output, any rounding mode)

(max over the template's rows, measured when the index is built). So s <= U(s^) with U increasing, and
every row left out of the top-k' has s^ <= the k'-th computed score: the bound is U of that score. The
float32 accumulation is the one assumption about torch's kernel; `check_bf16_accumulation` tests it on
the running machine before the first scan (a kernel accumulating in bf16 would lose 2^-9 steps that it
adds up) and refuses the kind where it fails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .base import NameIndexBackend
from .bounds import gamma
from .errors import VectorFormatError
from .registry import register_backend
from .vectors import Candidates, as_vectors, empty_topk, reject_search_params, sort_topk

_WHAT = "the bf16 index"
OUTPUT_ROUNDING = 2.0 ** -7  # bf16 has an 8-bit significand: |rounding| < 2^-7 |c| whatever the rounding mode
ROW_CHUNK = 1 << 17  # rows scanned at once: a [queries, ROW_CHUNK] bf16 score block
QUERY_BLOCK = 1024  # queries per scan
SELECT_BLOCK = 128  # rows whose scores are reduced to one max before the top-k (`_chunk_topk`)
SLACK = 1e-12  # relative margin for the float64 arithmetic of the bound itself
NORM_MARGIN = 1e-3  # the row norms are measured in float32 (error <= gamma_D ~ 3e-5 for D = 512), then raised by this

_accumulation_checked: bool | None = None


def keeps_the_bound(matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Whether `matmul` (bf16 x bf16 -> bf16) keeps the bound's promise: |s^ - a| <= 2^-7 |a| + gamma_D
    sum|a_i b_i| for a = the exact dot product of the bf16 inputs, on 64 x 64 products of 4096 terms with
    random signs. Their sums cancel (|a| ~ 64 typical products against sum|a_i b_i| ~ 4096), so a kernel
    accumulating in bf16 misses by about 10 % of |a|, far outside the inequality, while float32
    accumulation stays inside it by orders of magnitude."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn((64, 4096), generator=g).to(torch.bfloat16)
    b = torch.randn((4096, 64), generator=g).to(torch.bfloat16)
    exact = a.double() @ b.double()
    magnitude = a.double().abs() @ b.double().abs()
    err = (matmul(a, b).double() - exact).abs()
    return bool((err <= OUTPUT_ROUNDING * exact.abs() + gamma(4096) * magnitude).all())


def check_bf16_accumulation() -> None:
    """Refuse the kind, once per process, unless torch's bf16 matmul on this machine keeps the bound's promise."""
    global _accumulation_checked
    if _accumulation_checked is None:
        _accumulation_checked = keeps_the_bound(torch.matmul)
    if not _accumulation_checked:
        raise VectorFormatError("this torch's bf16 matmul does not accumulate in float32, which the bf16 index's "
                                "error bound needs; build with --index flat")


def _chunk_topk(queries: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest bf16 scores of queries against rows (float32 values, row ids), selected through block
    maxima: the scores of each run of SELECT_BLOCK rows are reduced to their max, the k best blocks are kept,
    and the k best scores among them. That is exact for the bound: any row outside the kept blocks scores at
    most the k-th kept block's max, and the k kept blocks hold k scores at least that high, so it is at most
    the k-th value returned (ties aside, the same top-k a full top-k gives). A full top-k over the score
    matrix cost about as much as the matmul; the block maxima are one pass (measured: 59 vs 67 ms for 300
    queries x 10^5 rows on the Xeon). Rows past the last whole block are scored apart."""
    whole = (len(rows) // SELECT_BLOCK) * SELECT_BLOCK
    parts = []
    if whole // SELECT_BLOCK > k:
        scores = (queries @ rows[:whole].T).view(len(queries), whole // SELECT_BLOCK, SELECT_BLOCK)
        _, blocks = scores.amax(dim=2).topk(k, dim=1)
        kept = scores.gather(1, blocks[:, :, None].expand(-1, -1, SELECT_BLOCK)).reshape(len(queries), -1)
        v, pos = kept.topk(k, dim=1)
        parts.append((v.float(), blocks.gather(1, pos // SELECT_BLOCK) * SELECT_BLOCK + pos % SELECT_BLOCK))
    else:
        whole = 0
    if whole < len(rows):
        scores = queries @ rows[whole:].T
        v, i = scores.topk(min(k, scores.shape[1]), dim=1)
        parts.append((v.float(), i + whole))
    return parts[0] if len(parts) == 1 else _merge_topk(parts[0], parts[1], k)


def _merge_topk(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of two (values, ids) top-k's of the same queries."""
    v, pos = torch.cat([a[0], b[0]], 1).topk(k, dim=1)
    return v, torch.cat([a[1], b[1]], 1).gather(1, pos)


@register_backend
class BF16ScanBackend(NameIndexBackend):
    """All rows in bfloat16, scanned in full; candidates with a certified bound (see the module docstring)."""

    kind: ClassVar[str] = "bf16"
    file_suffix: ClassVar[str] = ".bf16.npz"
    exact_search: ClassVar[bool] = False  # bf16 scores are candidates; the raw float32 rows decide
    # The bound is within ~0.005 of the computed scores: a few candidates beyond k certify (on the bench
    # generator, 10^5 names, every top-1 with 16 candidates), and each one costs a float64 re-score.
    extra_candidates: ClassVar[int | None] = 15
    # The few queries those leave open get a second scan with 512 before any brute force: a bf16 scan reads
    # half the bytes of the float32 brute force and usually certifies them.
    wider_candidates: ClassVar[int | None] = 512

    def __init__(self, dim: int, rows: torch.Tensor | None = None, max_norm: float = 0.0,
                 max_rounding: float = 0.0, max_norm_rounded: float = 0.0):
        self._dim = int(dim)
        self._chunks: list[torch.Tensor] = [] if rows is None else [rows]
        self.max_norm = max_norm  # max ||x|| over the rows (float64, rounded up)
        self.max_rounding = max_rounding  # max ||x - x^||
        self.max_norm_rounded = max_norm_rounded  # max ||x^||

    @classmethod
    def create(cls, dim: int, *, use_gpu: bool = False,
               search_params: Mapping[str, Any] | None = None) -> BF16ScanBackend:
        reject_search_params(_WHAT, search_params)
        return cls(dim)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return sum(len(c) for c in self._chunks)

    def _rows(self) -> torch.Tensor:
        if len(self._chunks) > 1:
            self._chunks = [torch.cat(self._chunks)]
        return self._chunks[0] if self._chunks else torch.zeros((0, self._dim), dtype=torch.bfloat16)

    def add(self, vectors: np.ndarray) -> None:
        x = torch.from_numpy(np.require(as_vectors(vectors, self.dim, what="name embeddings"), requirements="W"))
        rounded = x.to(torch.bfloat16)
        if len(x):
            # In float32 for speed, then rounded up: x - x^ is exact in float32 (x^ is x with fewer bits), and a
            # float32 sum of D squares is within gamma_D of the real one, far inside NORM_MARGIN.
            r = rounded.float()
            up = 1 + NORM_MARGIN
            self.max_norm = max(self.max_norm, float(torch.linalg.vector_norm(x, dim=1).max()) * up)
            self.max_rounding = max(self.max_rounding, float(torch.linalg.vector_norm(x - r, dim=1).max()) * up)
            self.max_norm_rounded = max(self.max_norm_rounded, float(torch.linalg.vector_norm(r, dim=1).max()) * up)
        self._chunks.append(rounded)

    def _scan(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest bf16 scores of each query (float64 values, exact copies of bf16) and their ids."""
        check_bf16_accumulation()
        rows = self._rows()
        qb = torch.from_numpy(np.require(q, requirements="W")).to(torch.bfloat16)
        out_v = np.empty((len(q), k), np.float64)
        out_i = np.empty((len(q), k), np.int64)
        for q0 in range(0, len(q), QUERY_BLOCK):
            block = qb[q0:q0 + QUERY_BLOCK]
            best = None
            for r0 in range(0, len(rows), ROW_CHUNK):
                v, i = _chunk_topk(block, rows[r0:r0 + ROW_CHUNK], k)
                best = (v, i + r0) if best is None else _merge_topk(best, (v, i + r0), k)
            out_v[q0:q0 + len(block)] = best[0].double().numpy()
            out_i[q0:q0 + len(block)] = best[1].numpy()
        return out_v, out_i

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The bf16 scan's own top-k (approximate scores; the engine re-scores them exactly)."""
        found = self.search_candidates(queries, k, params)
        return found.scores, found.ids

    def search_candidates(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None = None
                          ) -> Candidates:
        reject_search_params(_WHAT, params)
        q = as_vectors(queries, self.dim, what="queries")
        n = self.ntotal
        k = min(int(k), n)
        if k < 1:
            return Candidates(*empty_topk(len(q), 0), np.full(len(q), -np.inf if n == 0 else np.inf))
        v, i = self._scan(q, k)
        scores, ids = sort_topk(v.astype(np.float32), i)
        bound = np.full(len(q), -np.inf) if k >= n else self.upper_bound(q, v[:, k - 1])
        return Candidates(scores, ids, bound)

    def upper_bound(self, queries: np.ndarray, computed: np.ndarray) -> np.ndarray:
        """float64 [Q]: an upper bound on q.x for every row x whose computed bf16 score is <= `computed`[q]
        (the module docstring's U)."""
        q64 = queries.astype(np.float64)
        qr = torch.from_numpy(np.require(queries, np.float32, "CW")).to(torch.bfloat16).to(torch.float64).numpy()
        q_rounding = np.linalg.norm(q64 - qr, axis=1)
        q_norm_rounded = np.linalg.norm(qr, axis=1)
        c = np.asarray(computed, np.float64)
        c_max = c + OUTPUT_ROUNDING * np.abs(c) / (1 - OUTPUT_ROUNDING)
        accumulation = gamma(self.dim) * q_norm_rounded * self.max_norm_rounded
        rounding = q_rounding * self.max_norm + q_norm_rounded * self.max_rounding
        slack = (np.abs(c_max) + accumulation + rounding) * SLACK
        return c_max + accumulation + rounding + slack

    def save(self, path: Path) -> None:
        rows = self._rows().view(torch.int16).numpy()
        with open(path, "wb") as f:  # np.savez adds ".npz" to a bare path; a file object keeps the name
            np.savez(f, rows=rows, norms=np.array([self.max_norm, self.max_rounding, self.max_norm_rounded]))

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool = False) -> BF16ScanBackend:
        try:
            with np.load(path) as data:
                rows, norms = data["rows"], data["norms"]
        except (OSError, ValueError, KeyError) as e:
            raise VectorFormatError(f"{path} is not a bf16 index ({e})") from None
        if rows.dtype != np.int16 or rows.ndim != 2 or norms.shape != (3,) or not np.isfinite(norms).all():
            raise VectorFormatError(f"{path} is not a bf16 index (rows {rows.dtype} {rows.shape}, norms {norms})")
        return cls(rows.shape[1], torch.from_numpy(rows).view(torch.bfloat16), *map(float, norms))
