"""A full scan in bfloat16 with a rigorous error bound: exact answers at reduced-precision speed.

`--index bf16` keeps each template's rows rounded to bfloat16 (half of float32's bytes) and scans them with
torch's bf16 matmul, which CPUs with AMX or AVX-512 BF16 run several times faster than a float32 scan
(on a 2-core Xeon with AMX: 38 ms against 136 ms for 300 queries x 10^5 x 512). It is an approximate kind:
its top-k' are candidates, re-ranked exactly against the raw float32 rows (kept as the bf16 rows plus the
16 low bits of each float32 they dropped: `indexes.split_rows`, 4 bytes per element in all), and the top-1 is
certified by a bound on every row it left out (`indexes.exact`); what the bound cannot certify is answered
by brute force, so answers are exact either way.

The bound. For a float32 query q and row x, with q^ and x^ their bf16 roundings, the scan computes
c = q^.x^ accumulated in float32 (every product of two bf16 numbers is exact in float32), then rounds c to
bf16: s^. Then, for the real score s = q.x,

    |s - q^.x^|  <= ||q - q^|| max||x|| + ||q^|| max||x - x^||          (rounding of query and rows)
    |q^.x^ - c|  <= gamma_D ||q^|| max||x^||                            (float32 accumulation, any order)
    |c - s^|     <= 2^-7 |c|,  so  c <= s^ + 2^-7 |s^| / (1 - 2^-7)       (bf16 output, any rounding mode)

(max over the template's rows, measured when the index is built; the rows are rounded to nearest, ties away
from zero, so that with the int16 halves that rounding dropped they are the float32 rows too:
`indexes.split_rows`). So s <= U(s^) with U increasing, and
every row left out of the top-k' has s^ <= the k'-th computed score: the bound is U of that score. The
float32 accumulation is the one assumption about torch's kernel; `check_bf16_accumulation` tests it on
the running machine before the first scan (a kernel accumulating in bf16 would lose 2^-9 steps that it
adds up) and refuses the kind where it fails.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from idia_engine.engine.errors import ArtifactError

from .base import NameIndexBackend, template_file, vectors_file
from .bounds import gamma
from .errors import VectorFormatError
from .exact import Exactness, ExactSearchResult, exact_topk, exact_topk_among
from .registry import register_backend
from .split_rows import SplitRows, low_file, npz_member, round_to_bf16, write_low_halves
from .vectors import Candidates, as_vectors, empty_topk, reject_search_params, sort_topk

_WHAT = "the bf16 index"
OUTPUT_ROUNDING = 2.0 ** -7  # bf16 has an 8-bit significand: |rounding| < 2^-7 |c| whatever the rounding mode
WORKSPACE_BYTES = 128 << 20  # the [rows, queries] bf16 score workspace of one chunk of rows (`_row_chunk`)
MIN_ROW_CHUNK = 1 << 16  # rows selected from at once, at least (a full block of 1024 queries fills the workspace)
# Rows per matmul: enough for a 16 MiB bf16 output, at least SUB_CHUNK (150 photos x 10^5 rows: 23.7 ms per
# certified search with 55,924-row products against 25.6 with 8,192-row ones, AMX Xeon).
SUB_CHUNK = 8192
MATMUL_OUTPUT_BYTES = 16 << 20
QUERY_BLOCK = 1024  # queries per scan
# Rows whose scores are reduced to one max before the top-k (`_chunk_topk`); the block maxima of a query block
# ([rows / SELECT_BLOCK, QUERY_BLOCK] bf16) are kept for the second look. 64 against 128: 28.0 against
# 30.9 ms per certified search of 150 photos x 10^5 rows (fewer rows taken per kept block; AMX Xeon).
SELECT_BLOCK = 64
MAX_LOOK_BLOCKS = 64  # the second look scores at most this many blocks exactly per query; beyond, brute force
SLACK = 1e-12  # relative margin for the float64 arithmetic of the bound itself
NORM_MARGIN = 1e-3  # the row norms are measured in float32 (error <= gamma_D ~ 3e-5 for D = 512), then raised by this

_accumulation_checked: bool | None = None
_workspace = threading.local()


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


def _scores_buffer(n: int, m: int) -> torch.Tensor:
    """A [n, m] bf16 workspace, reused per thread: a fresh 10-100 MB tensor per scan costs its page faults
    (measured: about a third of a 140-query scan of 131072 rows)."""
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.numel() < n * m:
        buf = torch.empty(n * m, dtype=torch.bfloat16)
        _workspace.buf = buf
    return buf[:n * m].view(n, m)


def _row_chunk(queries: int) -> int:
    """Rows per `_chunk_topk` call for a block of this many queries: as many as fill WORKSPACE_BYTES of bf16
    scores (each chunk ends in its own selection and a merge; one chunk for 10^5 rows x 150 queries ran
    27.1 against 29.3 ms in two), in whole SELECT_BLOCKs, at least MIN_ROW_CHUNK."""
    rows = WORKSPACE_BYTES // (2 * max(1, queries))
    return max(MIN_ROW_CHUNK, rows // SELECT_BLOCK * SELECT_BLOCK)


def _block_max(scores: torch.Tensor) -> torch.Tensor:
    """[blocks, SELECT_BLOCK, M] -> the max over axis 1, [blocks, M], by halving: elementwise maxima ran 1.6x
    faster than torch's amax over the middle axis of bf16 scores here."""
    half = scores.shape[1] // 2
    out = torch.maximum(scores[:, :half], scores[:, half:])
    while half > 1:
        half //= 2
        torch.maximum(out[:, :half], out[:, half:2 * half], out=out[:, :half])
    return out[:, 0]


def _chunk_topk(qt: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest bf16 scores of the queries (columns of qt, bf16 [D, M]) against rows [n, D]: (values
    float32 [M, k'], row ids int64 [M, k'], k' = min(k, n)), and the block maxima bf16 [ceil(n / SELECT_BLOCK),
    M]: the largest score of each run of SELECT_BLOCK rows (the last run may be shorter).

    Scores are computed as rows @ qt in runs of rows (this orientation ran 1.5-2x faster than
    queries @ rows.T under oneDNN's AMX kernels here), then selected through the block maxima: the k best
    blocks are kept and the k best scores among them. That is exact for the bound: any row outside the kept
    blocks scores at most the k-th kept block's max, and the k kept blocks hold k scores at least that high,
    so it is at most the k-th value returned (ties aside, the same top-k a full top-k gives)."""
    n, m = len(rows), qt.shape[1]
    scores = _scores_buffer(n, m)
    sub = max(SUB_CHUNK, MATMUL_OUTPUT_BYTES // (2 * max(1, m)))
    for r0 in range(0, n, sub):
        torch.matmul(rows[r0:r0 + sub], qt, out=scores[r0:r0 + sub])
    whole = n // SELECT_BLOCK * SELECT_BLOCK
    maxima = [_block_max(scores[:whole].view(-1, SELECT_BLOCK, m))] if whole else []
    if whole < n:
        maxima.append(scores[whole:].amax(0, keepdim=True))
    block_max = maxima[0] if len(maxima) == 1 else torch.cat(maxima)
    _, blocks = block_max.T.topk(min(k, len(block_max)), dim=1)  # [M, kb]
    row = blocks[:, :, None] * SELECT_BLOCK + torch.arange(SELECT_BLOCK)  # [M, kb, SELECT_BLOCK]
    inside = row < n  # the last block may be short
    flat = row.clamp(max=n - 1) * m + torch.arange(m)[:, None, None]  # offsets into the [n, m] scores
    kept = scores.view(-1).take(flat.view(-1)).view(m, -1).float().masked_fill(~inside.view(m, -1), -torch.inf)
    v, pos = kept.topk(min(k, n), dim=1)
    return v, row.view(m, -1).gather(1, pos), block_max


def _merge_topk(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of two (values, ids) top-k's of the same queries."""
    v, pos = torch.cat([a[0], b[0]], 1).topk(min(k, a[0].shape[1] + b[0].shape[1]), dim=1)
    return v, torch.cat([a[1], b[1]], 1).gather(1, pos)


class SplitRowsStorage:
    """For kinds whose template file is a bf16 index (`BF16ScanBackend.save`): the raw float32 rows are kept
    as the low halves the bf16 rows dropped (`indexes.split_rows`), not as a second, float32 copy."""

    kind: ClassVar[str]
    file_suffix: ClassVar[str]

    @classmethod
    def build_disk_bytes(cls, num_names: int, num_templates: int, dim: int) -> int:
        """The bf16 rows and low halves of every template (4 bytes per element), and the float32 vectors file
        of the one template being split."""
        return num_names * num_templates * dim * 4 + num_names * dim * 4

    @classmethod
    def store_raw_rows(cls, t: int, build_dir: Path) -> None:
        """Write template t's low halves beside its saved bf16 file, checked to join back to the vectors file."""
        build_dir = Path(build_dir)
        write_low_halves(np.load(build_dir / vectors_file(t), mmap_mode="r"),
                         build_dir / template_file(t, cls.file_suffix), build_dir / low_file(t))

    @classmethod
    def keeps_vectors_file(cls) -> bool:
        return False

    @classmethod
    def raw_rows(cls, data_dir: Path, t: int) -> np.ndarray:
        """The vectors file while a build still has it (and in indexes built before the split), else the rows
        joined from the bf16 file and the low halves."""
        data_dir = Path(data_dir)
        if (data_dir / vectors_file(t)).is_file():
            return np.load(data_dir / vectors_file(t), mmap_mode="r")
        low = data_dir / low_file(t)
        if not low.is_file():
            raise ArtifactError(f"{low} is missing: index kind {cls.kind} keeps the float32 rows of template {t} "
                                "as the bf16 rows plus these low halves; rebuild the index")
        return SplitRows(data_dir / template_file(t, cls.file_suffix), low)


@register_backend
class BF16ScanBackend(SplitRowsStorage, NameIndexBackend):
    """All rows in bfloat16, scanned in full; candidates with a certified bound (see the module docstring)."""

    kind: ClassVar[str] = "bf16"
    file_suffix: ClassVar[str] = ".bf16.npz"
    exact_search: ClassVar[bool] = False  # bf16 scores are candidates; the raw float32 rows decide
    # The bound is within ~0.005 of the computed scores: a few candidates beyond k certify (on the bench
    # generator, 10^5 names, every top-1 with 16 candidates), and each one costs a float64 re-score.
    extra_candidates: ClassVar[int | None] = 15

    def __init__(self, dim: int, rows: torch.Tensor | None = None, max_norm: float = 0.0,
                 max_rounding: float = 0.0, max_norm_rounded: float = 0.0, source: Path | None = None):
        self._dim = int(dim)
        self.source = source  # the file the rows were loaded from (None: built in memory)
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
        rounded = round_to_bf16(x)  # nearest, ties away from zero: the float32 rows are these plus int16 halves
        # In float32 for speed, then rounded up: x - x^ is exact in float32 (x^ is x with fewer bits), and a
        # float32 sum of D squares is within gamma_D of the real one, far inside NORM_MARGIN. In chunks of rows,
        # so the float32 temporaries stay small beside 10^6 rows (2 GB each at D = 512).
        up = 1 + NORM_MARGIN
        for r0 in range(0, len(x), MIN_ROW_CHUNK):
            xc, r = x[r0:r0 + MIN_ROW_CHUNK], rounded[r0:r0 + MIN_ROW_CHUNK].float()
            self.max_norm = max(self.max_norm, float(torch.linalg.vector_norm(xc, dim=1).max()) * up)
            self.max_rounding = max(self.max_rounding, float(torch.linalg.vector_norm(xc - r, dim=1).max()) * up)
            self.max_norm_rounded = max(self.max_norm_rounded, float(torch.linalg.vector_norm(r, dim=1).max()) * up)
        self._chunks.append(rounded)

    def _scan(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """The k largest bf16 scores of each query of one block (at most QUERY_BLOCK; float64 values, exact
        copies of bf16), their ids, and the block maxima bf16 [ceil(N / SELECT_BLOCK), Q] (block b: rows
        b*SELECT_BLOCK onwards)."""
        check_bf16_accumulation()
        rows = self._rows()
        qt = torch.from_numpy(np.require(q, requirements="W")).to(torch.bfloat16).T
        k = min(k, len(rows))
        maxima = torch.empty((-(-len(rows) // SELECT_BLOCK), len(q)), dtype=torch.bfloat16)
        chunk = _row_chunk(len(q))
        best = None
        for r0 in range(0, len(rows), chunk):
            v, i, block_max = _chunk_topk(qt, rows[r0:r0 + chunk], k)
            maxima[r0 // SELECT_BLOCK:r0 // SELECT_BLOCK + len(block_max)] = block_max
            best = (v, i + r0) if best is None else _merge_topk(best, (v, i + r0), k)
        return best[0].double().numpy(), best[1].numpy(), maxima

    def certified_search(self, vectors: np.ndarray, queries: np.ndarray, k: int,
                         params: Mapping[str, Any] | None, fallback: bool, need: Exactness) -> ExactSearchResult:
        """Exact top-k over the template's float32 rows `vectors` from one bf16 scan (`indexes.exact.search_exact`
        hands this kind's searches here), QUERY_BLOCK queries at a time (so the block maxima the second look
        reads stay [N / SELECT_BLOCK, QUERY_BLOCK]).

        1. The scan's top k + extra_candidates are re-ranked exactly (`exact_topk_among`); a query is certified
           when its needed exact score (top-1, or the k-th for TOPK) beats the bound of the last candidate's
           bf16 score.
        2. Second look, from the same scan: every row outside the candidates lies in a block whose bf16 max
           bounds it, so for a query not certified the blocks whose bound reaches its needed score are scored
           exactly (at most MAX_LOOK_BLOCKS); every other row is then below it. No second scan is needed.
        3. What is left (near-ties spread over more blocks than that) is brute-forced, or flagged without
           fallback."""
        reject_search_params(_WHAT, params)
        q = as_vectors(queries, self.dim, what="queries")
        k = min(int(k), self.ntotal)
        if isinstance(vectors, SplitRows) and self.source is not None and vectors.high_file == self.source:
            # the rows' bf16 half is what this index holds: re-scoring reads only the low halves from disk
            vectors = vectors.with_high_rows(self._rows().view(torch.int16).numpy())
        scores, ids = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        bound = np.empty(len(q))
        for q0 in range(0, len(q), QUERY_BLOCK):
            block = slice(q0, q0 + QUERY_BLOCK)
            scores[block], ids[block], bound[block] = self._certified_block(vectors, q[block], k, need)
        with np.errstate(over="ignore"):
            bound32 = bound.astype(np.float32)
        certified, certified_topk = scores[:, 0] > bound32, scores[:, k - 1] > bound32
        ok = certified_topk if need is Exactness.TOPK else certified
        fell_back = np.zeros(len(q), bool)
        if fallback and not ok.all():
            redo = np.flatnonzero(~ok)
            scores[redo], ids[redo] = exact_topk(vectors, q[redo], k)
            fell_back[redo] = True
        return ExactSearchResult(scores, ids, certified, certified_topk, fell_back, need)

    def _certified_block(self, vectors: np.ndarray, q: np.ndarray, k: int, need: Exactness
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Steps 1 and 2 of `certified_search` for one block of queries: exact (scores, ids) [Q, k] of the rows
        looked at, and the float64 bound [Q] on every row not looked at."""
        n = self.ntotal
        kc = min(n, k + (self.extra_candidates or 0))
        v, cand, maxima = self._scan(q, kc)
        scores, ids = exact_topk_among(vectors, q, cand, k)
        bound = np.full(len(q), -np.inf) if kc >= n else self.upper_bound(q, v[:, kc - 1])
        col = 0 if need is Exactness.TOP1 else k - 1
        with np.errstate(over="ignore"):
            again = np.flatnonzero(~(scores[:, col] > bound.astype(np.float32)))
        if len(again):
            block_max = maxima[:, torch.from_numpy(again)].double().numpy()  # [blocks, A]
            with np.errstate(over="ignore"):
                reach = self.upper_bound(q[again], block_max).astype(np.float32)
            for j, qi in enumerate(again):
                look = ~(scores[qi, col] > reach[:, j])
                if look.sum() > MAX_LOOK_BLOCKS:
                    continue
                extra = (np.flatnonzero(look)[:, None] * SELECT_BLOCK + np.arange(SELECT_BLOCK)).ravel()
                pool = np.union1d(cand[qi], extra[extra < n])
                s, i = exact_topk_among(vectors, q[qi:qi + 1], pool[None], k)
                scores[qi], ids[qi] = s[0, :k], i[0, :k]
                bound[qi] = reach[~look, j].max(initial=-np.inf)
        return scores, ids, bound

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
        v, i = np.empty((len(q), k)), np.empty((len(q), k), np.int64)
        for q0 in range(0, len(q), QUERY_BLOCK):
            v[q0:q0 + QUERY_BLOCK], i[q0:q0 + QUERY_BLOCK], _ = self._scan(q[q0:q0 + QUERY_BLOCK], k)
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
                norms = data["norms"]
            # the rows in one read from where they lie in the (uncompressed) archive: np.load's member reader
            # copies them in small pieces, checksumming each (1.3 of 6.3 s of a search of 300 photos over
            # 10^5 names x 21 templates, AMX Xeon)
            offset, shape, dtype = npz_member(path, "rows")
            rows = np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        except (OSError, ValueError, KeyError, VectorFormatError) as e:
            raise VectorFormatError(f"{path} is not a bf16 index ({e})") from None
        if rows.dtype != np.int16 or rows.ndim != 2 or norms.shape != (3,) or not np.isfinite(norms).all():
            raise VectorFormatError(f"{path} is not a bf16 index (rows {rows.dtype} {rows.shape}, norms {norms})")
        return cls(rows.shape[1], torch.from_numpy(rows).view(torch.bfloat16), *map(float, norms), source=Path(path))
