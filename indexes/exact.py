"""Exact decisions from approximate indexes: candidates, exact re-rank, certificate, brute-force fallback.

The exact score. For a query q and a name row x (both float32) the engine's exact score is `exact_dot`:
every product of two float32 numbers is exact in float64, the D products are summed in float64 in one fixed
order (numpy's pairwise summation along a contiguous row, which depends only on D), and the sum is rounded
once to float32. Its error before that rounding is ~D 2^-53 relatively, far below float32 resolution, but
"far below" is not "never": a sum within that of a float32 rounding boundary could round either way under
another order. So every path that scores a (query, name) pair exactly (re-rank, brute force, the ensemble's
stage 2, the true name of a cell, names added for a run) calls `exact_dot`, and the same pair gets the same
float32 score in any batch. Rankings order rows by that value, descending, ties to the lower id
(`indexes.base.sort_topk`), the engine's one arg-max convention.

`search_exact(backend, vectors, queries, k, params)`, per template:
  (a) candidates: the backend's approximate top-k' (k' = k + DEFAULT_EXTRA_CANDIDATES unless given) with a
      certificate `bound[q]`: every row not among them has exact (real) score q.x <= bound[q]
      (the backend's `search_candidates`: list and code bounds for faiss indexes, k'-th score + float32
      rounding for exact backends ("flat", "dense"), +inf where nothing is known);
  (b) exact re-rank of the candidates against `vectors`, the template's raw float32 rows (the ground truth);
  (c) certification: a left-out row x has float32(q.x) <= float32(bound) (rounding to nearest is monotone),
      so the top-1 is exact when s_1 > float32(bound) (strict: an equal score with a lower id would win),
      and the whole top-k when s_k > float32(bound);
  (a'-c') a kind with a search of its own that is certified the same way (`certified_search`: the bf16
      scan, whose block maxima give a second look without a second scan) answers instead, unless the caller
      fixed `candidates`;
  (d) queries not certified (at the level `need` asks for) are answered by `exact_topk`, a brute force over
      all rows in bounded memory, or, with fallback=False, keep the re-ranked answer and are flagged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .bounds import gamma
from .errors import VectorFormatError
from .matmul import float32_matmul, matmul
from .split_rows import SplitRows
from .vectors import Candidates, as_vectors, read_rows, sort_topk

if TYPE_CHECKING:  # base imports this module (its default searchers re-rank with search_exact)
    from .base import NameIndexBackend

log = logging.getLogger(__name__)

# k' = k + 63 candidates: the k'-th approximate score must sit below the k-th exact one by more than the
# code error; how many SQ8 certifies with 31, 63 and 127 extra is in benchmarks/README.md.
DEFAULT_EXTRA_CANDIDATES = 63
_ROW_BLOCK = 1 << 25  # float32 elements of rows read at once by the brute force (128 MiB)
_FILTER_EXTRA = 16  # rows per chunk the brute-force filter keeps beyond k (more only for near-ties)
_PAIR_BLOCK = 1 << 22  # float64 elements of the exact re-rank gathered at once (32 MiB)
_QUERY_BLOCK = 4096  # queries per brute-force pass over the rows
# exact_topk_among screens a block of queries by a GEMM over its distinct candidates while that costs at most this
# many times the multiply-adds of the gathered product: at 15.6 times (the ensemble's K' = 256 candidates of 32
# photos, 4,000 distinct of 8,192) the GEMM ran 45 ms against 59 for 300 photos; at 29 (no overlap), 76 against 68.
GEMM_RATIO = 20


class Exactness(str, Enum):
    """What must be exact for a query to count as answered exactly."""

    TOP1 = "top1"  # the arg-max (the engine's decision) and its score
    TOPK = "topk"  # all k returned ids and scores (ranks, margins)


@dataclass(frozen=True)
class ExactSearchResult:
    """Per query: the top-k by exact score, and how it was obtained."""

    scores: np.ndarray  # float32 [Q, k] exact scores (cosine for unit rows; higher = closer), ordered by sort_topk
    ids: np.ndarray  # int64 [Q, k] row ids (= name ids)
    certified: np.ndarray  # bool [Q]: the candidates' top-1 is provably the exact arg-max
    certified_topk: np.ndarray  # bool [Q]: the candidates' whole top-k is provably exact
    fell_back: np.ndarray  # bool [Q]: answered by brute force over all rows
    need: Exactness  # the level a query had to be certified at to skip the fallback

    @property
    def exact(self) -> np.ndarray:
        """bool [Q]: the answer is exact at the `need` level (certified, or answered by brute force)."""
        ok = self.certified_topk if self.need is Exactness.TOPK else self.certified
        return ok | self.fell_back

    def summary(self) -> dict[str, Any]:
        nq = len(self.ids)
        frac = (lambda m: round(float(m.mean()), 6) if nq else None)
        return {"queries": nq, "k": int(self.ids.shape[1]) if self.ids.ndim == 2 else 0, "need": self.need.value,
                "certified_top1": int(self.certified.sum()), "certified_topk": int(self.certified_topk.sum()),
                "fell_back": int(self.fell_back.sum()), "not_exact": int((~self.exact).sum()),
                "certified_top1_fraction": frac(self.certified),
                "certified_topk_fraction": frac(self.certified_topk), "fell_back_fraction": frac(self.fell_back)}


def _check_rows(vectors: Any, dim: int, ntotal: int | None = None) -> np.ndarray:
    """The raw rows as given (a numpy array, np.memmap or SplitRows, never copied whole): float32 [N, dim]."""
    if not isinstance(vectors, (np.ndarray, SplitRows)):
        raise VectorFormatError("name vectors must be a numpy array, np.memmap or SplitRows, got "
                                f"{type(vectors).__name__}")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise VectorFormatError(f"name vectors have shape {vectors.shape}, expected [N, {dim}]")
    if vectors.dtype != np.float32:
        raise VectorFormatError(f"name vectors must be float32, got dtype {vectors.dtype}")
    if ntotal is not None and len(vectors) != ntotal:
        raise VectorFormatError(f"name vectors hold {len(vectors)} rows, the index holds {ntotal}")
    return vectors


def exact_dot(rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The engine's exact score (module docstring): float32 [...] of rows float32 [..., D] against queries
    [..., D] (float32 or their float64 copies) broadcast against them. The products are formed in a float64
    copy of the rows and reduced along the last axis, a contiguous row each: numpy sums each such row
    pairwise in an order fixed by D alone, whatever the batch around it."""
    rows, queries = np.asarray(rows), np.asarray(queries)
    p = np.empty(np.broadcast_shapes(rows.shape, queries.shape), np.float64)
    p[...] = rows
    np.multiply(p, queries, out=p)
    return p.sum(axis=-1).astype(np.float32)


def _pair_scores(vectors: np.ndarray, queries: np.ndarray, qi: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float32 exact_dot(vectors[ids[p]], queries[qi[p]]) for every pair p, gathered in blocks of bounded
    memory."""
    out = np.empty(len(ids), np.float32)
    step = max(1, _PAIR_BLOCK // max(1, vectors.shape[1]))
    for lo in range(0, len(ids), step):
        out[lo:lo + step] = exact_dot(vectors[ids[lo:lo + step]], queries[qi[lo:lo + step]])
    return out


def exact_scores(vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact scores float32 [Q, m] of queries [Q, D] against rows ids [Q, m] (-1 -> -inf)."""
    rows = _check_rows(vectors, np.shape(queries)[1])
    q = as_vectors(queries, rows.shape[1], what="queries")
    ids = np.asarray(ids, np.int64)
    if ids.ndim == 2 and ids.size and (ids >= 0).all():  # the usual case: a full [Q, m]; no gather of queries
        nq, m = ids.shape
        out = np.empty(ids.shape, np.float32)
        step = max(1, _PAIR_BLOCK // max(1, m * rows.shape[1]))
        for lo in range(0, nq, step):
            x = rows[ids[lo:lo + step].ravel()].reshape(-1, m, rows.shape[1])
            out[lo:lo + step] = exact_dot(x, q[lo:lo + step, None, :])
        return out
    out = np.full(ids.shape, -np.inf, np.float32)
    qi, col = np.nonzero(ids >= 0)
    if len(qi):
        out[qi, col] = _pair_scores(rows, q, qi, ids[qi, col])
    return out


def exact_topk_among(vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k among each query's candidate rows: (scores float32 [Q, k'], ids int64 [Q, k']),
    k' = min(k, m), ordered by sort_topk, for queries [Q, D] and candidate ids [Q, m] (-1: none; fewer than k
    valid candidates leave -inf / -1 at the end). The same answer as sorting `exact_scores` of every candidate.

    Screened first: a float32 score s~ of a D-term dot product is within delta = gamma_D ||q|| ||x|| of the
    real one in any summation order (||x|| from the float32 sum of squares, its gamma_D divided out). Only
    candidates whose s~ + delta reaches the k-th largest s~ - delta (less the float32 rounding margin of
    `_keep_threshold`, so ties keep the engine's order) can be in the exact top-k; only they get `exact_dot`,
    typically one or two of 16.

    The float32 scores come from one of two products with the same bound, per block of queries: where the
    block's candidates overlap (photos of one person share most of theirs) a GEMM of the block's queries
    against its distinct candidate rows, each gathered and its norm taken once; otherwise each query's
    candidates gathered [Q, m, D] and multiplied. The GEMM is taken while it costs at most GEMM_RATIO times
    the multiply-adds of the gathered product: it reads each row once instead of once per query."""
    rows = _check_rows(vectors, np.shape(queries)[1])
    q = as_vectors(queries, rows.shape[1], what="queries")
    ids = np.asarray(ids, np.int64)
    nq, m = ids.shape
    k = min(int(k), m)
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    if nq == 0 or k < 1:
        return out_s, out_i
    g = gamma(rows.shape[1])
    qn = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    step = max(1, _PAIR_BLOCK // max(1, m * rows.shape[1]))
    for lo in range(0, nq, step):
        cid = ids[lo:lo + step]
        valid = cid >= 0
        qb = q[lo:lo + step]
        safe = np.where(valid, cid, 0)
        distinct, where = np.unique(safe, return_inverse=True)
        where = where.reshape(cid.shape)
        if len(distinct) * len(cid) <= GEMM_RATIO * cid.size:
            x = read_rows(rows, distinct)  # [U, D], U distinct candidates of the block
            s32 = np.take_along_axis(matmul(qb, x.T), where, axis=1).astype(np.float64)
            xn = _norm_bounds(x, g)[where]
        else:
            x = rows[safe.ravel()].reshape(len(cid), m, rows.shape[1])
            s32 = matmul(x, qb[:, :, None])[..., 0].astype(np.float64)
            xn = _norm_bounds(x, g)
            x, where = x.reshape(-1, rows.shape[1]), np.arange(cid.size).reshape(cid.shape)
        delta = g * qn[lo:lo + step, None] * xn + 1e-30
        lower = np.where(valid, s32 - delta, -np.inf)
        with np.errstate(invalid="ignore"):
            thr = _keep_threshold(np.partition(lower, m - k, axis=1)[:, m - k])
        keep = valid & (s32 + delta >= thr[:, None])
        exact = np.full(cid.shape, -np.inf, np.float32)
        exact[keep] = exact_dot(x[where[keep]], qb[np.nonzero(keep)[0]])
        s, i = sort_topk(exact, np.where(keep, cid, -1))
        out_s[lo:lo + step], out_i[lo:lo + step] = s[:, :k], i[:, :k]
    return out_s, out_i


def _norm_bounds(x: np.ndarray, g: float) -> np.ndarray:
    """float64 [...]: upper bounds on ||x|| of rows x [..., D], from the float32 sum of squares (its gamma_D
    divided out, then a relative 1e-6 for the float64 arithmetic here)."""
    return np.sqrt(np.einsum("...d,...d->...", x, x).astype(np.float64) / (1 - g)) * (1 + 1e-6)


def _keep_threshold(lower: np.ndarray) -> np.ndarray:
    """Rows whose real score may still round (in float32) to a value >= float32(lower) lie above this:
    two reals that round to the same float32 differ by at most 2^-23 |value| (plus subnormal spacing)."""
    return lower - (2.0 ** -22 * np.abs(lower) + 1e-30)


def _exact_topk_block(rows: np.ndarray, q: np.ndarray, k: int, chunk_rows: int | None, row_norm: float | None,
                      device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Brute force for one block of queries: a float32 filter (GEMM + top-k per chunk) with a rigorous error
    margin, then the exact float64 re-rank of the survivors.

    A float32 score s~ of a D-term dot product is within delta = gamma_D ||q|| max||x|| of the real one (any
    summation order). Each chunk of rows returns its k + extra best s~; L, the k-th largest lower bound
    s~ - delta among them, is <= the real k-th best score, so only rows whose upper bound s~ + delta reaches
    L (less the float32 rounding margin of `_keep_threshold`) can be in the exact top-k. A row a chunk did
    not return has s~ <= that chunk's last returned score: if that upper bound is below the threshold, the
    query is settled; otherwise it is redone with 8x more per chunk (at worst whole chunks)."""
    step = chunk_rows or max(1024, _ROW_BLOCK // rows.shape[1])
    q64 = q.astype(np.float64)
    qn = np.sqrt(np.einsum("ij,ij->i", q64, q64))
    out_s = np.empty((len(q), k), np.float32)
    out_i = np.empty((len(q), k), np.int64)
    todo, extra = np.arange(len(q)), _FILTER_EXTRA
    while len(todo):
        s, i, safe = _filter_pass(rows, q[todo], qn[todo], k, k + extra, step, row_norm, device)
        out_s[todo[safe]], out_i[todo[safe]] = s, i
        todo, extra = todo[~safe], extra * 8
    return out_s, out_i


def _chunk_topk(q: np.ndarray, x: np.ndarray, kk: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """The float32 top-kk of q against one chunk of rows: a plain GEMM and torch.topk (any order within a tie;
    the exact re-rank orders them). On the CPU a torch GEMM (`indexes.matmul`; not faiss.knn: faiss leaves
    BLAS for small query batches and is then ~5x slower, and the batches brute force gets, photos certificates
    left open, are small); on a GPU cuBLAS in full float32 (TF32 held off: the error bound assumes float32
    products)."""
    if device.type == "cpu":
        s = torch.from_numpy(matmul(q, x.T))
        top_s, top_i = torch.topk(s, kk, dim=1)
        return top_s.numpy(), top_i.numpy().astype(np.int64)
    with float32_matmul():
        s = torch.from_numpy(q).to(device) @ torch.from_numpy(x).to(device).T
    top_s, top_i = torch.topk(s, kk, dim=1)
    return top_s.cpu().numpy(), top_i.cpu().numpy().astype(np.int64)


def brute_force_device(use_gpu: bool) -> torch.device:
    """Where exact_topk multiplies: CUDA when asked for and torch sees a GPU, else the CPU (with a log line)."""
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    if use_gpu:
        log.warning("GPU brute force asked for, but torch sees no CUDA GPU: multiplying on the CPU")
    return torch.device("cpu")


def _filter_pass(rows: np.ndarray, q: np.ndarray, qn: np.ndarray, k: int, per_chunk: int,
                 step: int, row_norm: float | None, device: torch.device
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass of `_exact_topk_block`: (scores, ids) of the settled queries and the mask of settled ones."""
    n, d = rows.shape
    g = gamma(d)
    got_s, got_i, got_delta, missed = [], [], [], []
    for start in range(0, n, step):
        x = np.ascontiguousarray(rows[start:start + step], dtype=np.float32)
        c = len(x)
        # float32 sums of squares (all terms >= 0) are within gamma_D of the real ones: divide it out
        xmax = row_norm if row_norm is not None else (
            float(np.sqrt(float(np.einsum("ij,ij->i", x, x).max()) / (1 - g))) * (1 + 1e-6))
        delta = g * qn * xmax + 1e-30
        kk = min(per_chunk, c)
        dist, ids = _chunk_topk(q, x, kk, device)
        got_s.append(dist.astype(np.float64))
        got_i.append(ids + start)
        got_delta.append(np.broadcast_to(delta[:, None], dist.shape))
        missed.append(dist[:, -1] + delta if kk < c else np.full(len(q), -np.inf))
    s, ids, delta = np.hstack(got_s), np.hstack(got_i), np.hstack(got_delta)
    lower = s - delta
    thr = _keep_threshold(np.partition(lower, lower.shape[1] - k, axis=1)[:, -k:].min(axis=1))
    safe = np.max(missed, axis=0) < thr
    keep = ((s + delta) >= thr[:, None]) & safe[:, None]
    qi, col = np.nonzero(keep)
    ii = ids[qi, col]
    s32 = _pair_scores(rows, q, qi, ii)
    order = np.lexsort((ii, -s32, qi))
    qi, ii, s32 = qi[order], ii[order], s32[order]
    rank = np.arange(len(qi)) - np.searchsorted(qi, np.arange(len(q)))[qi]
    sel = rank < k  # every settled query kept >= k rows: those holding the k best lower bounds
    nsafe = int(safe.sum())
    return s32[sel].reshape(nsafe, k), ii[sel].reshape(nsafe, k), safe


def max_row_norm(vectors: np.ndarray, *, chunk_rows: int | None = None) -> float:
    """An upper bound on the L2 norm of every row (float32 sums of squares, their gamma_D error divided out),
    read in chunks: pass it to repeated `exact_topk` calls over the same rows to skip the per-call pass."""
    rows = _check_rows(vectors, np.shape(vectors)[1] if np.ndim(vectors) == 2 else -1)
    step = chunk_rows or max(1024, _ROW_BLOCK // max(1, rows.shape[1]))
    best = 0.0
    for start in range(0, len(rows), step):
        x = np.asarray(rows[start:start + step], dtype=np.float32)
        best = max(best, float(np.einsum("ij,ij->i", x, x).max(initial=0.0)))
    return float(np.sqrt(best / (1 - gamma(rows.shape[1])))) * (1 + 1e-6)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, *, chunk_rows: int | None = None,
               row_norm: float | None = None, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force exact top-k over all rows of `vectors` (float32 [N, D], array or memmap, read in chunks of
    `chunk_rows` rows): (scores float32 [Q, k'], ids int64 [Q, k']), k' = min(k, N), ordered by sort_topk.
    row_norm: `max_row_norm(vectors)` when known (else each chunk's is computed). use_gpu: multiply on a CUDA
    GPU when torch sees one (chunks of rows stream from host memory; the exact re-rank stays float64 on the
    CPU), else on the CPU."""
    q = as_vectors(queries, np.shape(vectors)[1] if np.ndim(vectors) == 2 else None, what="queries")
    rows = _check_rows(vectors, q.shape[1])
    k = min(int(k), len(rows))
    if k < 1 or len(q) == 0:
        return np.zeros((len(q), max(k, 0)), np.float32), np.zeros((len(q), max(k, 0)), np.int64)
    out_s = np.empty((len(q), k), np.float32)
    out_i = np.empty((len(q), k), np.int64)
    device = brute_force_device(use_gpu)
    for lo in range(0, len(q), _QUERY_BLOCK):
        out_s[lo:lo + _QUERY_BLOCK], out_i[lo:lo + _QUERY_BLOCK] = _exact_topk_block(
            rows, q[lo:lo + _QUERY_BLOCK], k, chunk_rows, row_norm, device)
    return out_s, out_i


def backend_candidates(backend: NameIndexBackend, queries: np.ndarray, k: int,
                       params: Mapping[str, Any] | None = None) -> Candidates:
    """Approximate top-k with a certificate, from any backend (see the module docstring, step (a))."""
    return backend.search_candidates(queries, k, params)


def _rerank(rows: np.ndarray, q: np.ndarray, cand: Candidates, k: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps (b) and (c): the candidates re-scored exactly, the top-k kept; (scores, ids, top-1 certified,
    top-k certified)."""
    scores, ids = exact_topk_among(rows, q, cand.ids, k)
    with np.errstate(over="ignore"):
        bound32 = np.asarray(cand.bound, np.float64).astype(np.float32)
    found = (cand.ids >= 0).sum(axis=1)
    return scores, ids, (found >= 1) & (scores[:, 0] > bound32), (found >= k) & (scores[:, k - 1] > bound32)


def search_exact(backend: NameIndexBackend, vectors: np.ndarray, queries: np.ndarray, k: int,
                 params: Mapping[str, Any] | None = None, fallback: bool = True, *,
                 candidates: int | None = None, need: Exactness = Exactness.TOPK) -> ExactSearchResult:
    """Exact top-k of `queries` [Q, D] over the rows of `vectors` (float32 [N, D], array or memmap: the
    template's raw embeddings, row i = name i, the rows `backend` was built from), using `backend` for
    candidates.

    params: per-call search parameters of the backend (e.g. {"nprobe": 32}).
    fallback: answer queries not certified at level `need` by brute force (True), or flag them (False).
    candidates: k', the number of approximate candidates re-ranked (default k + the backend's extra_candidates,
        else DEFAULT_EXTRA_CANDIDATES).
    need: TOPK (every returned rank exact) or TOP1 (only the arg-max must be exact; cheaper).
    """
    rows = _check_rows(vectors, backend.dim, backend.ntotal)
    q = as_vectors(queries, backend.dim, what="queries")
    nq, n = len(q), len(rows)
    k = min(int(k), n)
    none = np.zeros(nq, bool)
    if k < 1 or nq == 0:
        empty = (np.zeros((nq, max(k, 0)), np.float32), np.zeros((nq, max(k, 0)), np.int64))
        return ExactSearchResult(*empty, ~none, ~none, none, need)
    if candidates is not None and int(candidates) < 1:
        raise VectorFormatError(f"candidates must be >= 1, got {candidates!r}")
    extra = getattr(backend, "extra_candidates", None)  # kinds with a tight bound ask for fewer
    extra = DEFAULT_EXTRA_CANDIDATES if extra is None else extra
    kc = min(n, max(k, int(candidates) if candidates is not None else k + extra))
    own = getattr(backend, "certified_search", None)
    if own is not None and candidates is None:
        result = own(rows, q, k, params, fallback, need)
        log.info("exact search over %d rows (%s, its own certified search): %d queries, %d certified (top-1), "
                 "%d by brute force", n, backend.kind, nq, int(result.certified.sum()), int(result.fell_back.sum()))
        return result
    scores, ids, certified, certified_topk = _rerank(rows, q, backend_candidates(backend, q, kc, params), k)
    ok = certified_topk if need is Exactness.TOPK else certified
    fell_back = none.copy()
    if fallback and not ok.all():
        redo = np.flatnonzero(~ok)
        scores[redo], ids[redo] = exact_topk(rows, q[redo], k)
        fell_back[redo] = True
    result = ExactSearchResult(scores, ids, certified, certified_topk, fell_back, need)
    log.info("exact search over %d rows (%s): %d queries, %d certified (top-1), %d certified (top-%d), "
             "%d by brute force", n, backend.kind, nq, int(certified.sum()),
             int(certified_topk.sum()), k, int(fell_back.sum()))
    return result
