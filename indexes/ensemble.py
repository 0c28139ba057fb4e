"""The template-ensemble prefilter: one search over the names' mean embeddings instead of one per template.

A name's T template embeddings x_{t,i} (unit rows, float32) sit close to their mean. Write
    x_{t,i} = m_i + g_t + r_{t,i},   m_i = mean_t x_{t,i},   g_t = mean_i (x_{t,i} - m_i),
where g_t is the template's common offset and r_{t,i} the residual, ||r_{t,i}|| <= eps_t (the template's
radius). For a query q:
  stage 1: candidates = the top-K' names by q.m_i (exact flat search over the N means by default, or any
           backend over the means via `indexes.exact.backend_candidates`, which also returns `bound`, an upper
           bound on q.m_i for every name left out);
  stage 2: per template t, the exact top-k among the candidates (the engine's exact score, see
           `indexes.exact`; a float32 screen with a rigorous margin first), ordered by `sort_topk`;
  certificate: a left-out name has q.x_{t,i} <= bound + q.g_t + ||q|| eps_t, so the candidates' top-1 is the
           exact arg-max over all names when it is strictly above float32 of that (plus slack);
  fallback: uncertified (query, template) pairs are answered by `exact_topk` over the template's rows, or,
           with fallback=False, keep the re-ranked answer and are flagged.

How tight is the certificate? It spends ||q|| eps_t, the Cauchy-Schwarz worst case of q.r over a ball; for
image queries against CLIP-like text rows eps_t is of the order of the top score itself (figures in
benchmarks/README.md), so certificates are rare and exactness comes from the fallback (the same reason IVF
cannot certify, see `indexes.choice`). Without fallback the prefilter is an approximate search whose
agreement with the exact answer the benchmarks measure. `radius_name` (per name, max over templates) is recorded for analysis.

Sources of template rows: a sequence of T arrays or np.memmaps [N, D], or a callable `rows(t, ids)` ->
float32 [len(ids), D] (ids an int64 array) for rows that are regenerated or read on demand.
The build and stage 2 read a memory-mapped source's rows with pread (`indexes.vectors.read_rows`), so holding
all T mappings keeps none of their pages in RSS.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import (
    IndexData,
    IndexKind,
    NameIndexBackend,
    TemplateSearcher,
    TemplateSearchResult,
)
from .bounds import REL_INFLATE
from .errors import IndexFileError, VectorFormatError
from .exact import Exactness, ExactSearchResult, backend_candidates, exact_topk, exact_topk_among
from .flat import FlatIPBackend
from .matmul import matmul
from .registry import register_backend
from .split_rows import SplitRows
from .vectors import Candidates, as_vectors, read_rows

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_CANDIDATES = 256  # K': names re-ranked per query (stage 2 costs K' x T rows per query)
ENSEMBLE_DIR = "ensemble"  # the ensemble's folder in a build directory
_BUILD_BLOCK = 1 << 24  # float32 elements of rows (all templates of a block of names) read at once (64 MiB)

RowFn = Callable[[int, np.ndarray], np.ndarray]
RowSource = Sequence[np.ndarray] | RowFn
_FILES = {"means": "means.npy", "offsets": "offsets.npy", "radius": "radius.npy", "radius_name": "radius_name.npy"}
_MANIFEST = "ensemble.json"


def _fetch(source: RowSource, t: int, ids: np.ndarray | slice, dim: int) -> np.ndarray:
    """Rows `ids` of template t as float32 [n, dim] (an array source is sliced; a callable gets an id array)."""
    if callable(source):
        if isinstance(ids, slice):
            ids = np.arange(ids.start, ids.stop, dtype=np.int64)
        rows = np.asarray(source(t, ids))
    else:
        rows = read_rows(source[t], ids)  # a block of names while building is a slice: one read
    if rows.ndim != 2 or rows.shape[1] != dim or rows.dtype != np.float32:
        raise VectorFormatError(f"template {t} rows must be float32 [n, {dim}], got {rows.dtype} {rows.shape}")
    return rows


def _full_rows(source: RowSource, t: int, n: int, dim: int) -> np.ndarray:
    """All rows of template t as an array (or the memmap itself): what the brute-force fallback scans."""
    if not callable(source):
        rows = source[t]
        if isinstance(rows, (np.ndarray, SplitRows)) and rows.dtype == np.float32 and rows.shape == (n, dim):
            return rows
    return _fetch(source, t, slice(0, n), dim)


@dataclass(frozen=True)
class EnsembleSearchResult:
    """Per query and template: the top-k by exact score, and how it was obtained."""

    scores: np.ndarray  # float32 [Q, T, k] exact scores (cosine; higher = closer), ordered by sort_topk
    ids: np.ndarray  # int64 [Q, T, k] name ids
    certified: np.ndarray  # bool [Q, T]: the re-ranked top-1 is provably the exact arg-max over all names
    fell_back: np.ndarray  # bool [Q, T]: answered by brute force over all rows of the template
    bound: np.ndarray  # float64 [Q, T]: every non-candidate name scores <= bound (+inf: nothing known)

    @property
    def top1(self) -> np.ndarray:
        """int64 [Q, T]: the predicted name per query and template."""
        return self.ids[:, :, 0]

    @property
    def exact(self) -> np.ndarray:
        """bool [Q, T]: the top-1 is exact (certified or answered by brute force)."""
        return self.certified | self.fell_back

    def per_template(self, t: int) -> ExactSearchResult:
        """Template t's answers in `indexes.exact`'s form (top-k certified only where k == 1)."""
        cert = self.certified[:, t]
        topk = cert if self.ids.shape[2] == 1 else np.zeros_like(cert)
        return ExactSearchResult(self.scores[:, t].copy(), self.ids[:, t].copy(), cert.copy(), topk,
                                 self.fell_back[:, t].copy(), Exactness.TOP1)

    def summary(self) -> dict[str, Any]:
        n = self.certified.size
        frac = (lambda m: round(float(m.mean()), 6) if n else None)
        return {"pairs": int(n), "certified": int(self.certified.sum()), "fell_back": int(self.fell_back.sum()),
                "not_exact": int((~self.exact).sum()), "certified_fraction": frac(self.certified),
                "fell_back_fraction": frac(self.fell_back)}


def _rerank(rows: np.ndarray, uniq: np.ndarray, inv: np.ndarray, valid: np.ndarray, q: np.ndarray, k: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2 for one template: the exact top-k among each query's candidates, ordered by sort_topk, from
    the union of their rows fetched once (`rows`, row j = name uniq[j]; query i's candidates are
    rows inv[i] where valid[i]). `exact_topk_among` screens them in float32 with a rigorous margin and scores
    exactly only those that can still reach the k-th place. uniq is sorted, so ties between local rows fall
    to the lower name id, as over the names themselves."""
    scores, local = exact_topk_among(rows, q, np.where(valid, inv, -1), k)
    return scores, np.where(local >= 0, uniq[np.maximum(local, 0)], -1)


class TemplateEnsemble:
    """Mean embeddings, template offsets and residual radii of T templates x N names (see module docstring)."""

    def __init__(self, means: np.ndarray, offsets: np.ndarray, radius: np.ndarray, radius_name: np.ndarray):
        self.means = as_vectors(means, what="name means")  # float32 [N, D] unnormalised mean over templates
        self.offsets = np.ascontiguousarray(offsets, np.float64)  # float64 [T, D] g_t
        self.radius = np.asarray(radius, np.float64)  # float64 [T] eps_t = max_i ||x_{t,i} - m_i - g_t||
        self.radius_name = np.asarray(radius_name, np.float64)  # float64 [N] max_t ||x_{t,i} - m_i - g_t||
        n, d = self.means.shape
        if self.offsets.shape != (len(self.radius), d) or self.radius_name.shape != (n,):
            raise VectorFormatError(f"inconsistent ensemble: means {self.means.shape}, offsets "
                                    f"{self.offsets.shape}, radius {self.radius.shape}, radius_name "
                                    f"{self.radius_name.shape}")
        self._flat = None

    @property
    def num_names(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_templates(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.means.nbytes + self.offsets.nbytes + self.radius.nbytes + self.radius_name.nbytes)

    @staticmethod
    def disk_bytes(num_names: int, num_templates: int, dim: int) -> int:
        """Bytes of a saved ensemble's arrays (means float32 [N, D], offsets float64 [T, D], radius float64 [T],
        radius_name float64 [N]), with a page per file for .npy headers and the manifest."""
        return num_names * dim * 4 + num_templates * dim * 8 + num_templates * 8 + num_names * 8 + 5 * 4096

    # --- build -------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, source: RowSource, num_names: int, num_templates: int, dim: int, *,
              block_names: int | None = None, progress: Callable[[str, int, int], None] | None = None
              ) -> TemplateEnsemble:
        """Two streaming passes over blocks of names (all T templates of a block at once, bounded memory):
        means and offsets, then radii. Residuals are taken against the stored float32 means and float64
        offsets, so x = m + g + r holds for the values the search uses."""
        n, t_count = int(num_names), int(num_templates)
        if n < 1 or t_count < 1 or dim < 1:
            raise VectorFormatError(f"need >= 1 name, template and dim; got {n}, {t_count}, {dim}")
        step = block_names or max(1, _BUILD_BLOCK // (t_count * dim))
        means = np.empty((n, dim), np.float32)
        off_sum = np.zeros((t_count, dim), np.float64)
        blocks = list(range(0, n, step))
        total = 2 * len(blocks)
        for b, lo in enumerate(blocks):
            sl = slice(lo, min(n, lo + step))
            x = np.stack([_fetch(source, t, sl, dim) for t in range(t_count)]).astype(np.float64)  # [T, B, D]
            m = x.mean(axis=0).astype(np.float32)
            means[sl] = m
            off_sum += (x - m.astype(np.float64)).sum(axis=1)
            if progress:
                progress("ensemble", b + 1, total)
        offsets = off_sum / n
        radius = np.zeros(t_count, np.float64)
        radius_name = np.zeros(n, np.float64)
        for b, lo in enumerate(blocks):
            sl = slice(lo, min(n, lo + step))
            m = means[sl].astype(np.float64)
            norms = np.stack([np.linalg.norm(_fetch(source, t, sl, dim).astype(np.float64) - m - offsets[t], axis=1)
                              for t in range(t_count)])  # [T, B]
            radius = np.maximum(radius, norms.max(axis=1))
            radius_name[sl] = norms.max(axis=0)
            if progress:
                progress("ensemble", len(blocks) + b + 1, total)
        # float64 norms are off by ~D 2^-53 relatively; inflate so the radius stays an upper bound.
        radius = radius * (1 + REL_INFLATE) + 1e-12
        radius_name = radius_name * (1 + REL_INFLATE) + 1e-12
        log.info("template ensemble of %d names x %d templates: radius %.4f..%.4f", n, t_count, radius.min(),
                 radius.max())
        return cls(means, offsets, radius, radius_name)

    # --- save / load -------------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Write means/offsets/radii as .npy and a small JSON manifest (manifest last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # Plain writes: the ensemble is written into the engine's private build directory, whose publication
        # (fsync of every file, one rename, then the manifest) is the one commit point; files of an
        # unpublished build directory are rewritten when the build resumes.
        for key, name in _FILES.items():
            np.save(folder / name, getattr(self, key))
        manifest = {"schema_version": SCHEMA_VERSION, "kind": "template-ensemble", "num_names": self.num_names,
                    "num_templates": self.num_templates, "dim": self.dim, "files": _FILES,
                    "radius_max": float(self.radius.max())}
        (folder / _MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path, *, mmap: bool = False) -> TemplateEnsemble:
        folder = Path(folder)
        try:
            manifest = json.loads((folder / _MANIFEST).read_text())
            arrays = {k: np.load(folder / v, mmap_mode="r" if mmap and k == "means" else None)
                      for k, v in _FILES.items()}
        except (OSError, ValueError) as e:
            raise IndexFileError(f"cannot read a template ensemble from {folder}: {e}") from None
        if manifest.get("schema_version") != SCHEMA_VERSION or manifest.get("kind") != "template-ensemble":
            raise IndexFileError(f"{folder / _MANIFEST} is not a template ensemble of schema {SCHEMA_VERSION}")
        ens = cls(**arrays)
        if (ens.num_names, ens.num_templates, ens.dim) != (manifest["num_names"], manifest["num_templates"],
                                                           manifest["dim"]):
            raise IndexFileError(f"{folder}: arrays do not match the manifest's sizes")
        return ens

    # --- search ------------------------------------------------------------------------------------------

    def _default_backend(self) -> NameIndexBackend:
        if self._flat is None:
            flat = FlatIPBackend.create(self.dim)
            flat.add(self.means)
            self._flat = flat
        return self._flat

    def candidates(self, queries: np.ndarray, k: int, backend: NameIndexBackend | None = None,
                   params: Mapping[str, Any] | None = None) -> Candidates:
        """Stage 1: top-k names by q.m_i with an upper bound on q.m_i for every name left out."""
        q = as_vectors(queries, self.dim, what="queries")
        return backend_candidates(backend if backend is not None else self._default_backend(), q, k, params)

    def template_bounds(self, queries: np.ndarray, mean_bound: np.ndarray) -> np.ndarray:
        """float64 [Q, T]: an upper bound on q.x_{t,i} over names whose q.m_i <= mean_bound[q]."""
        q64 = np.asarray(queries, np.float64)
        qn = np.sqrt(np.einsum("ij,ij->i", q64, q64))
        mb = np.asarray(mean_bound, np.float64)[:, None]
        qg = matmul(q64, self.offsets.T)
        reach = qn[:, None] * self.radius[None, :]
        with np.errstate(invalid="ignore"):
            # float64 sums of D products are off by ~D 2^-53 relatively: a relative slack of 1e-9 covers them.
            slack = (np.abs(mb) + np.abs(qg) + reach) * REL_INFLATE + 1e-12
            return np.where(np.isfinite(mb), mb + qg + reach + slack, mb)

    def search(self, queries: np.ndarray, source: RowSource, k: int = 1, *, candidates: int = DEFAULT_CANDIDATES,
               fallback: bool = True, backend: NameIndexBackend | None = None,
               params: Mapping[str, Any] | None = None, templates: Sequence[int] | None = None
               ) -> EnsembleSearchResult:
        """Top-k of `queries` (float32 [Q, D], unit rows) per template over all N names.

        source: the templates' raw rows (sequence of T arrays/memmaps [N, D] or callable rows(t, ids)).
        candidates: K', names kept by stage 1. fallback: brute force for uncertified (query, template) pairs.
        backend/params: a backend built over `self.means` (and its per-call parameters) for stage 1; default
        exact flat search. templates: the template indexes to answer (default all T; result axis 1 follows).
        """
        q = as_vectors(queries, self.dim, what="queries")
        n = self.num_names
        t_list = list(range(self.num_templates)) if templates is None else [int(t) for t in templates]
        nq, nt = len(q), len(t_list)
        k = min(int(k), n)
        if int(candidates) < 1:
            raise VectorFormatError(f"candidates must be >= 1, got {candidates!r}")
        kc = min(n, max(k, int(candidates)))
        scores = np.full((nq, nt, max(k, 0)), -np.inf, np.float32)
        ids = np.full((nq, nt, max(k, 0)), -1, np.int64)
        certified = np.zeros((nq, nt), bool)
        fell_back = np.zeros((nq, nt), bool)
        bound = np.full((nq, nt), np.inf)
        if nq == 0 or k < 1:
            return EnsembleSearchResult(scores, ids, certified, fell_back, bound)
        cand = self.candidates(q, kc, backend, params)
        cid = cand.ids
        valid = cid >= 0
        bound = self.template_bounds(q, cand.bound)[:, t_list]
        with np.errstate(over="ignore"):
            bound32 = bound.astype(np.float32)
        # Stage 2 per template: gather the union of candidate rows once, then the exact top-k among them.
        uniq, inv = np.unique(np.where(valid, cid, cid.max(initial=0)), return_inverse=True)
        inv = inv.reshape(cid.shape)
        for j, t in enumerate(t_list):
            rows = _fetch(source, t, uniq, self.dim)
            ss, si = _rerank(rows, uniq, inv, valid, q, k)
            scores[:, j], ids[:, j] = ss[:, :k], si[:, :k]
            certified[:, j] = valid.any(axis=1) & (ss[:, 0] > bound32[:, j])
            if fallback and not certified[:, j].all():
                redo = np.flatnonzero(~certified[:, j])
                full = _full_rows(source, t, n, self.dim)
                scores[redo, j], ids[redo, j] = exact_topk(full, q[redo], k)
                fell_back[redo, j] = True
        result = EnsembleSearchResult(scores, ids, certified, fell_back, bound)
        log.info("ensemble search: %d queries x %d templates over %d names, K'=%d: %d certified, %d by brute "
                 "force", nq, nt, n, kc, int(certified.sum()), int(fell_back.sum()))
        return result


@register_backend
class EnsembleIndex(IndexKind):
    """The index kind "ensemble": no per-template index; the `TemplateEnsemble` of all templates is built
    once they are all on disk (folder ENSEMBLE_DIR) and searched against their raw rows."""

    kind: ClassVar[str] = "ensemble"
    exact_search: ClassVar[bool] = False  # exact only through the certificate or the fallback

    @classmethod
    def build_template(cls, t: int, rows: np.ndarray, out_dir: Path, *, use_gpu: bool,
                       search_params: Mapping[str, Any]) -> None:
        """Nothing per template: the template's raw rows are what the ensemble is built from and re-ranks."""

    @classmethod
    def build_disk_bytes(cls, num_names: int, num_templates: int, dim: int) -> int:
        """The raw float32 vectors of every template, and the ensemble."""
        return num_names * num_templates * dim * 4 + TemplateEnsemble.disk_bytes(num_names, num_templates, dim)

    @classmethod
    def finish_build(cls, out_dir: Path, rows: Sequence[np.ndarray], *,
                     progress: Callable[[str, int, int], None]) -> None:
        n, dim = rows[0].shape if len(rows) else (0, 0)  # no templates: build says so
        TemplateEnsemble.build(rows, n, len(rows), dim, progress=progress).save(Path(out_dir) / ENSEMBLE_DIR)

    @classmethod
    def open_searchers(cls, index: IndexData, *, use_gpu: bool) -> Iterator[TemplateSearcher]:
        """One searcher over all templates (stage 1 is shared by them)."""
        yield EnsembleSearcher(TemplateEnsemble.load(index.data_dir / ENSEMBLE_DIR),
                               tuple(index.vectors(t) for t in range(index.num_templates)))


@dataclass(frozen=True)
class EnsembleSearcher:
    """All templates at once through the ensemble; params: {"candidates": K'} (default `default_candidates`)."""

    default_candidates: ClassVar[int] = DEFAULT_CANDIDATES
    ensemble: TemplateEnsemble
    sources: tuple[np.ndarray, ...]  # the templates' raw rows, memory-mapped

    @property
    def templates(self) -> tuple[int, ...]:
        return tuple(range(len(self.sources)))

    def candidates(self, params: Mapping[str, Any] | None) -> int:
        return int((params or {}).get("candidates", self.default_candidates))

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None, fallback: bool
               ) -> TemplateSearchResult:
        res = self.ensemble.search(queries, self.sources, k, candidates=self.candidates(params), fallback=fallback)
        return TemplateSearchResult(self.templates, res.scores, res.ids, np.zeros_like(res.certified),
                                    res.certified, res.fell_back)
