"""Any FAISS index built from a factory string ("Flat", "IVF4096,SQ8", "IVF4096,PQ64", "HNSW32,Flat", ...),
metric inner product, with the bookkeeping that lets `indexes.exact.search_exact` certify its answers.

Registry kind: "faiss" (factory "Flat") or "faiss:<factory>" (e.g. "faiss:IVF1024,SQ8"); the kind string alone
recreates the backend, so the index manifest's `index_kind` is enough to reopen it. `describe()` gives the
same facts (and a few more) as a JSON-able dict; `FaissBackend.from_description` rebuilds an empty backend.

Files written by `save(path)`: the faiss index at `path` (faiss.write_index; readable by any faiss) and the
sidecar `path` + ".json" (describe() plus the per-list statistics behind the certificates; `indexes.sidecar`).

Certificates. `search_candidates(queries, k', params)` returns an approximate top-k' *and* `bound[q]`, an upper
bound on the exact score q.x of every row x it did not return (the bounds are derived in `indexes.bounds`).
Three structures are understood:

* IVF with Flat, SQ or PQ codes (IndexIVFFlat, IndexIVFScalarQuantizer, IndexIVFPQ). The backend picks the
  nprobe lists of highest centroid score itself (float64 scores) and scans them with `search_preassigned`,
  so which lists were scanned is known, not guessed; the list a row is stored in is read back from its own
  code (see `add`). bound[q] = max of the bound over unprobed lists and the bound on probed rows not
  returned (-inf for that part when fewer than k' rows came back: every row of the probed lists was).
* Flat codes scanned whole (IndexFlat, IndexScalarQuantizer, IndexPQ): every row is scored, so
  bound = s~_k' + E(q) + ||q|| eps (-inf when k' >= ntotal).
* Anything else (HNSW, fast-scan PQ, refine and pre-transform chains): no bound is known, +inf.

How tight the bounds are in practice (which structures certify image queries) is measured in
benchmarks/README.md.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np

# gpu.faiss_gpu_count is looked up at call time, so tests can patch it in one place.
from . import gpu as _gpu
from .base import NameIndexBackend
from .bounds import REL_INFLATE, ListStats, code_slack, norms64
from .errors import (
    IndexFileError,
    IndexNotTrainedError,
    IndexSpecError,
    SearchParamsError,
)
from .matmul import matmul
from .params import ParamRules, default_nprobe, search_parameters
from .registry import register_backend
from .sidecar import read_sidecar, sidecar_path, write_sidecar
from .structure import (
    Structure,
    build_cpu_index,
    clean,
    faiss_message,
    find_ivf,
    is_hnsw,
    listnos,
    structure_of,
    type_name,
)
from .vectors import Candidates, as_vectors, empty_topk, sort_topk

log = logging.getLogger(__name__)

# Scalar quantizers train per-dimension [min, max] ranges on the sample and clip rows outside them; the
# clipped rows set the worst-case code error the certificate must use (0.10 instead of 0.011 for SQ8 at
# dim 128). Widening each range by 20% of its width on both sides removes the clipping for a 1.4x larger
# typical error (faiss ScalarQuantizer.rangestat_arg with RS_minmax).
DEFAULT_SQ_RANGE_EXPANSION = 0.2
_ADD_BLOCK = 65_536  # rows encoded (and measured in float64) at once by `add`
_PROBE_DIM = 3840  # 2^8 * 15: divisible by every usual PQ m, so a factory check is dimension-agnostic


# Factory strings faiss parses but then crashes the process on (found by building, training, adding to and
# searching each in a child process): a parameter of 0 (HNSW0, PQ16x0, RQ0x8, RR0: segfault or abort;
# OPQ16_0: SIGFPE; NSG0: never returns), a graph degree of 1 (HNSW1 segfaults, NSG1 never returns). A
# C++ crash cannot be caught, so these are refused from the string before faiss sees it; so are sizes no
# index can afford (PQ8x24: 2^24 centroids per sub-quantizer; IVF2000000000 allocates before training).
MAX_FACTORY_NUMBER = 1 << 20  # IVF1048576 is the largest list count faiss's guidelines name (10^9 rows)
MAX_CODE_BITS = 16  # bits per sub-quantizer code ("PQ16x<bits>", "RQ4x<bits>")
_GRAPH_DEGREE = re.compile(r"(HNSW|NSG)(\d+)")
_CODE_BITS = re.compile(r"(?:PQ|RQ|LSQ|PRQ|PLSQ)\d+(?:x\d+)?x(\d+)")


def check_factory_numbers(factory: str) -> None:
    """Raise IndexSpecError for a factory string whose numbers would crash faiss or exhaust memory."""
    for match in re.finditer(r"\d+", factory):
        value = int(match.group())
        if value == 0:
            raise IndexSpecError(f"faiss factory string {factory!r} has a parameter of 0 (at character "
                                 f"{match.start() + 1}), which crashes faiss; every size must be >= 1")
        if value > MAX_FACTORY_NUMBER:
            raise IndexSpecError(f"faiss factory string {factory!r} has the parameter {value}; at most "
                                 f"{MAX_FACTORY_NUMBER} is supported")
    for match in _GRAPH_DEGREE.finditer(factory):
        if int(match.group(2)) < 2:
            raise IndexSpecError(f"faiss factory string {factory!r}: {match.group()} has graph degree "
                                 f"{match.group(2)}, which crashes faiss; use {match.group(1)}32 (>= 2)")
    for match in _CODE_BITS.finditer(factory):
        if int(match.group(1)) > MAX_CODE_BITS:
            raise IndexSpecError(f"faiss factory string {factory!r}: {match.group()} has {match.group(1)}-bit "
                                 f"codes; at most {MAX_CODE_BITS} bits (2^bits centroids each) are supported")


@register_backend
class FaissBackend(NameIndexBackend):
    """A faiss index from a factory string, inner-product metric, with certificate bookkeeping.

    Build: `create(dim, factory=...)`, then `train(sample)` if `needs_training`, then `add` in chunks (row ids
    continue from `ntotal`). The CPU index is the master copy; with `use_gpu` a GPU copy is cloned lazily
    before the first search after a change."""

    kind: ClassVar[str] = "faiss"
    file_suffix: ClassVar[str] = ".faiss"
    factory: ClassVar[str] = "Flat"  # the factory string of this (possibly bound) class
    _bound_classes: ClassVar[dict[str, type[FaissBackend]]] = {}

    def __init__(self, index: faiss.Index, factory: str, *, use_gpu: bool = False, gpu_float16: bool = True,
                 search_params: Mapping[str, Any] | None = None, stats: ListStats | None = None,
                 sq_range_expansion: float = DEFAULT_SQ_RANGE_EXPANSION):
        self._index = index
        self._factory = factory
        self._sq_range_expansion = float(sq_range_expansion)
        self._structure = structure_of(index)
        self._any_ivf = find_ivf(index)  # for search parameters, whatever the structure
        self._ivf = self._any_ivf if self._structure is Structure.IVF else None
        if self._structure is not Structure.OPAQUE and stats is None and index.ntotal > 0:
            log.warning("faiss index %r holds rows but no statistics: no score bound, exact search falls back",
                        factory)
            self._structure, self._ivf = Structure.OPAQUE, None
        self._gpu_float16 = bool(gpu_float16)
        self._centroids: np.ndarray | None = None
        self._stats = stats
        if self._structure is not Structure.OPAQUE and self._stats is None and index.is_trained:
            self._init_stats()
        if self._structure is Structure.IVF and index.is_trained:
            self._centroids = self._ivf.quantizer.reconstruct_n(0, self._ivf.nlist)
        self._rules = ParamRules.of(index, self._any_ivf, factory)
        self._default_params = dict(search_params or {})
        if self._any_ivf is not None and "nprobe" not in self._default_params:
            self._default_params["nprobe"] = default_nprobe(self._any_ivf.nlist)
        self._rules.check(self._default_params, what="default search parameters")
        self._gpu: _gpu.GpuCopy | None = None
        self._want_gpu = self._decide_gpu(use_gpu)
        if self._structure is Structure.OPAQUE:
            log.info("faiss index %r gives no score bound: exact search falls back to brute force for it",
                     factory)

    # --- construction -----------------------------------------------------------------------------------

    @classmethod
    def with_spec(cls, spec: str) -> type[FaissBackend]:
        """The class bound to one factory string: kind "faiss:<factory>" (checked for syntax here)."""
        factory = spec.strip()
        if factory not in cls._bound_classes:
            check_factory_numbers(factory)
            try:  # fail fast on a string faiss cannot parse, before any model is loaded
                build_cpu_index(factory, _PROBE_DIM)
            except IndexSpecError as e:
                detail = str(e).lower()
                if "dimension of the vector" not in detail and "multiple" not in detail:
                    raise IndexSpecError(f"faiss factory string {factory!r} is not valid: "
                                         f"{str(e).split(': ', 1)[-1]}") from None
            cls._bound_classes[factory] = type(f"FaissBackend[{factory}]", (FaissBackend,),
                                               {"kind": f"faiss:{factory}", "factory": factory})
        return cls._bound_classes[factory]

    @classmethod
    def create(cls, dim: int, *, use_gpu: bool = False, search_params: Mapping[str, Any] | None = None,
               factory: str | None = None, gpu_float16: bool = True,
               sq_range_expansion: float = DEFAULT_SQ_RANGE_EXPANSION) -> FaissBackend:
        """An empty index. `factory` defaults to the class's; a bound class accepts only its own.

        gpu_float16: on a GPU, flat indexes store float16 (half the memory; the certificate accounts for it).
        search_params: default per-call parameters (e.g. {"nprobe": 64}); per-call ones override them.
        sq_range_expansion: widening of scalar-quantizer ranges at training (see DEFAULT_SQ_RANGE_EXPANSION)."""
        factory = cls._resolve_factory(factory)
        return cls(build_cpu_index(factory, dim), factory, use_gpu=use_gpu, gpu_float16=gpu_float16,
                   search_params=search_params, sq_range_expansion=sq_range_expansion)

    @classmethod
    def _resolve_factory(cls, factory: str | None) -> str:
        if factory is None:
            return cls.factory
        factory = factory.strip()
        if cls is not FaissBackend and factory != cls.factory:
            raise IndexSpecError(f"index kind {cls.kind!r} builds {cls.factory!r}, not {factory!r}")
        return factory

    def describe(self) -> dict[str, Any]:
        """JSON-able facts about this index; `from_description` rebuilds an empty one like it."""
        return {
            "kind": f"faiss:{self._factory}",
            "factory": self._factory,
            "metric": "inner_product",
            "dim": self.dim,
            "ntotal": self.ntotal,
            "is_trained": bool(self._index.is_trained),
            "index_type": type_name(self._index),
            "nlist": int(self._any_ivf.nlist) if self._any_ivf is not None else None,
            "certificate": self._structure.value,
            "search_params": dict(self._default_params),
            "gpu_float16": self._gpu_float16,
            "sq_range_expansion": self._sq_range_expansion,
            "on_gpu": self.on_gpu,
        }

    @classmethod
    def from_description(cls, desc: Mapping[str, Any], *, use_gpu: bool = False) -> FaissBackend:
        """An empty backend with the factory, dimension and options of `desc` (a `describe()` dict)."""
        try:
            factory, dim = desc["factory"], int(desc["dim"])
        except (KeyError, TypeError, ValueError):
            raise IndexSpecError(f"index description needs 'factory' and 'dim', got keys {sorted(desc)}") from None
        if desc.get("metric", "inner_product") != "inner_product":
            raise IndexSpecError(f"index description has metric {desc['metric']!r}; only inner_product is built")
        return cls.with_spec(factory).create(
            dim, use_gpu=use_gpu, gpu_float16=bool(desc.get("gpu_float16", True)),
            search_params=desc.get("search_params") or None,
            sq_range_expansion=float(desc.get("sq_range_expansion", DEFAULT_SQ_RANGE_EXPANSION)))

    # --- state --------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def factory_string(self) -> str:
        return self._factory

    @property
    def structure(self) -> Structure:
        return self._structure

    @property
    def needs_training(self) -> bool:
        return not self._index.is_trained

    @property
    def min_train_size(self) -> int:
        """Rows `train` needs at least (faiss recommends ~39x that for k-means)."""
        if self._any_ivf is not None:
            return int(self._any_ivf.nlist)
        if type(self._index).__name__ == "IndexPQ":
            return 1 << int(self._index.pq.nbits)
        return 1

    @property
    def recommended_train_size(self) -> int:
        """Rows a good training sample has (k-means wants ~39 points per centroid; SQ ranges want many)."""
        size = 39 * self.min_train_size if self.min_train_size > 1 else 1
        if self._sq() is not None or self._pq() is not None:
            size = max(size, 10_000)
        return size

    # The codec lives on the IVF layer or the index itself; faiss exposes `sq` / `pq` only on those that have one.
    def _sq(self) -> Any:
        inner = self._any_ivf if self._any_ivf is not None else self._index
        return getattr(inner, "sq", None)

    def _pq(self) -> Any:
        inner = self._any_ivf if self._any_ivf is not None else self._index
        return getattr(inner, "pq", None)

    @property
    def search_params(self) -> dict[str, Any]:
        """The default per-call search parameters (a copy)."""
        return dict(self._default_params)

    @property
    def on_gpu(self) -> bool:
        return self._want_gpu

    def _decide_gpu(self, use_gpu: bool) -> bool:
        if not use_gpu:
            return False
        if _gpu.faiss_gpu_count() == 0:
            log.warning("GPU search asked for, but faiss sees no GPU: searching on the CPU (%s)", self._factory)
            return False
        if is_hnsw(self._index):
            log.warning("faiss has no GPU version of HNSW indexes: searching %r on the CPU", self._factory)
            return False
        return True

    def _gpu_indexes(self) -> list | None:
        """The GPU clones, made on first use after a change; None when searching on the CPU."""
        if not self._want_gpu or self.ntotal == 0:
            return None
        if self._gpu is None:
            try:
                self._gpu = _gpu.clone_to_gpus(self._index, is_flat=type_name(self._index) == "IndexFlat",
                                               is_pq=type(self._index).__name__ == "IndexIVFPQ",
                                               float16_flat=self._gpu_float16)
            except (RuntimeError, AttributeError) as e:  # AttributeError: a faiss build without GPU support
                log.warning("cannot clone faiss index %r to the GPU (%s): searching on the CPU",
                            self._factory, faiss_message(e))
                self._want_gpu = False
                return None
        return self._gpu.indexes

    def _init_stats(self) -> None:
        self._stats = ListStats.empty(int(self._ivf.nlist) if self._ivf is not None else 1)

    # --- building -----------------------------------------------------------------------------------------

    def train(self, sample: np.ndarray) -> None:
        """Train the index (k-means of IVF, codebooks of SQ/PQ) on a sample of rows; a no-op when not needed."""
        x = as_vectors(sample, self.dim, what="training sample")
        if not self.needs_training:
            log.debug("faiss index %r needs no training", self._factory)
            return
        if len(x) < self.min_train_size:
            raise IndexNotTrainedError(
                f"training sample has {len(x)} rows; faiss index {self._factory!r} needs at least "
                f"{self.min_train_size} (better {39 * self.min_train_size})")
        sq = self._sq()
        if sq is not None and sq.rangestat == faiss.ScalarQuantizer.RS_minmax:
            sq.rangestat_arg = self._sq_range_expansion
        pq_owner = self._any_ivf if self._any_ivf is not None else self._index
        if getattr(pq_owner, "do_polysemous_training", False):  # a faiss attribute of PQ indexes only
            # Polysemous codes only serve Hamming pre-filtering (polysemous_ht), never used here; the
            # training permutes 256 codes per sub-quantizer and dominates PQ training time.
            pq_owner.do_polysemous_training = False
        clustering = None
        if self._any_ivf is not None and self._want_gpu:
            try:  # k-means assignment on the GPU: the slow part of training large IVF indexes
                res = faiss.StandardGpuResources()
                clustering = (res, faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatIP(self.dim)))
                self._any_ivf.clustering_index = clustering[1]
            except (RuntimeError, AttributeError) as e:
                log.warning("IVF training on the GPU failed to start (%s): training on the CPU", faiss_message(e))
                clustering = None
        try:
            self._index.train(x)
        except RuntimeError as e:
            raise IndexNotTrainedError(f"training faiss index {self._factory!r} on {len(x)} rows failed: "
                                       f"{faiss_message(e)}") from None
        finally:
            if clustering is not None:
                self._any_ivf.clustering_index = None
        if self._ivf is not None:
            self._centroids = self._ivf.quantizer.reconstruct_n(0, self._ivf.nlist)
        if self._structure is not Structure.OPAQUE:
            self._init_stats()
        self._gpu = None

    def add(self, vectors: np.ndarray) -> None:
        """Append rows (ids continue from `ntotal`), updating the certificate statistics."""
        x = as_vectors(vectors, self.dim, what="name embeddings")
        if self.needs_training:
            raise IndexNotTrainedError(
                f"faiss index {self._factory!r} must be trained before rows are added: call train(sample) with "
                f">= {self.min_train_size} rows (e.g. a random sample of the names' embeddings)")
        if len(x) == 0:
            return
        self._gpu = None  # stale
        if self._structure is Structure.OPAQUE:
            self._index.add(x)
            return
        for lo in range(0, len(x), _ADD_BLOCK):  # bounded float64 temporaries
            self._add_block(x[lo:lo + _ADD_BLOCK])

    def _add_block(self, x: np.ndarray) -> None:
        # Encode once: the stored code, the list it is stored in and the reconstruction all come from it.
        codes = self._index.sa_encode(x)
        xhat = self._index.sa_decode(codes).astype(np.float64)
        x64 = x.astype(np.float64)
        if self._structure is Structure.IVF:
            lists = listnos(codes, int(self._ivf.coarse_code_size()))
            self._stats.add_listed(x64, xhat, lists, self._centroids[lists].astype(np.float64))
        else:
            self._stats.add_whole(x, x64, xhat, flat=type_name(self._index) == "IndexFlat")
        self._index.add_sa_codes(codes)

    # --- search -------------------------------------------------------------------------------------------

    def _effective_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        merged = dict(self._default_params)
        merged.update(self._rules.check(params or {}))
        return merged

    def _raw_search(self, q: np.ndarray, k: int, params: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        sp, _keep = search_parameters(self._index, params)  # _keep: objects sp points to, alive until we return
        gpus = self._gpu_indexes()
        if gpus is None:
            return self._index.search(q, k, params=sp)

        def one(index, rows):
            return index.search(q[rows], k, params=sp)

        if params.get("max_codes"):
            raise SearchParamsError("max_codes is not supported by faiss GPU indexes; search on the CPU")
        return _gpu.split_over_gpus(gpus, q, one)

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k: (scores float32 [Q, k'], ids int64 [Q, k']), k' = min(k, ntotal), rows ordered by
        `sort_topk`; where the index found fewer than k' rows, ids are -1 and scores -inf (at the end)."""
        q = as_vectors(queries, self.dim, what="queries")
        eff = self._effective_params(params)
        k = min(int(k), self.ntotal)
        if k < 1 or len(q) == 0:
            return empty_topk(len(q), k)
        scores, ids = self._raw_search(q, k, eff)
        scores, ids = clean(scores, ids)
        return sort_topk(scores, ids)

    def search_candidates(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None = None
                          ) -> Candidates:
        """Approximate top-k' (k' = min(k, ntotal)) and, per query, an upper bound on the exact score of every
        row left out (see the module docstring). IVF lists are probed by centroid score, as faiss does."""
        q = as_vectors(queries, self.dim, what="queries")
        eff = self._effective_params(params)
        k = min(int(k), self.ntotal)
        nq = len(q)
        if k < 1 or nq == 0:
            bound = np.full(nq, -np.inf if self.ntotal == 0 else np.inf)
            return Candidates(*empty_topk(nq, k), bound)
        if self._structure is Structure.OPAQUE:
            scores, ids = clean(*self._raw_search(q, k, eff))
            everything = (k >= self.ntotal) & (ids[:, -1] >= 0)  # every row came back
            return Candidates(scores, ids, np.where(everything, -np.inf, np.inf))
        if eff.get("max_codes"):
            raise SearchParamsError("max_codes leaves probed lists partly unscanned, so no bound holds; "
                                    "drop it for certified search")
        qn = norms64(q.astype(np.float64))
        if self._structure is Structure.CODES:
            scores, ids = clean(*self._raw_search(q, k, {}))
            float16 = self._gpu is not None and self._want_gpu and self._gpu.float16_storage
            return Candidates(scores, ids, self._stats.codes_bound(self.dim, scores, ids, qn, self.ntotal,
                                                                   float16=float16))
        return self._ivf_candidates(q, qn, k, int(eff["nprobe"]))

    def list_upper_bounds(self, queries: np.ndarray) -> np.ndarray:
        """float64 [Q, nlist]: an upper bound on q.x over the members of each list (-inf for empty lists)."""
        q64 = as_vectors(queries, self.dim, what="queries").astype(np.float64)
        return self._stats.list_bounds(self._centroids, norms64(q64), matmul(q64, self._centroids.astype(np.float64).T))

    def _ivf_candidates(self, q: np.ndarray, qn: np.ndarray, k: int, nprobe: int) -> Candidates:
        nq, nlist = len(q), int(self._ivf.nlist)
        cs = matmul(q.astype(np.float64), self._centroids.astype(np.float64).T)  # exact centroid scores
        ub = self._stats.list_bounds(self._centroids, qn, cs)
        nprobe = min(nprobe, nlist)
        if nprobe < nlist:
            # faiss's own choice (highest centroid score). Probing by highest bound was tried: on
            # out-of-distribution queries it lowers recall (0.24 vs 0.60 at nprobe 8/64) and certifies no more.
            probe = np.argpartition(-cs, nprobe - 1, axis=1)[:, :nprobe]
        else:
            probe = np.broadcast_to(np.arange(nlist), (nq, nlist)).copy()
        probe = np.ascontiguousarray(probe, dtype=np.int64)
        coarse = np.ascontiguousarray(np.take_along_axis(cs, probe, 1), dtype=np.float32)
        scores, ids = clean(*self._preassigned(q, k, probe, coarse))
        left = ub.copy()
        np.put_along_axis(left, probe, -np.inf, axis=1)
        unprobed = left.max(axis=1)
        probed_eps = np.take_along_axis(np.broadcast_to(self._stats.eps, ub.shape), probe, 1).max(axis=1)
        slack = code_slack(self.dim, qn, self._stats.scale) + qn * probed_eps * (1 + REL_INFLATE)
        if self._gpu is not None and self._gpu.float16_luts:
            slack = slack + 2.0 ** -10 * qn * self._stats.scale
        probed = np.where(ids[:, -1] < 0, -np.inf, scores[:, -1].astype(np.float64) + slack)
        return Candidates(scores, ids, np.maximum(unprobed, probed))

    def _preassigned(self, q: np.ndarray, k: int, probe: np.ndarray, coarse: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        sp = faiss.SearchParametersIVF()
        sp.nprobe = int(probe.shape[1])  # a per-call object: the shared index's nprobe is never touched

        def one(index, rows):
            n = rows.stop - rows.start
            x = np.ascontiguousarray(q[rows])
            p = np.ascontiguousarray(probe[rows])
            c = np.ascontiguousarray(coarse[rows])
            dist = np.empty((n, k), np.float32)
            lab = np.empty((n, k), np.int64)
            index.search_preassigned_c(n, faiss.swig_ptr(x), k, faiss.swig_ptr(p), faiss.swig_ptr(c),
                                       faiss.swig_ptr(dist), faiss.swig_ptr(lab), False, sp)
            return dist, lab

        gpus = self._gpu_indexes()
        if gpus is None or k > _gpu.GPU_MAX_K or probe.shape[1] > _gpu.GPU_MAX_K:
            return one(self._ivf, slice(0, len(q)))
        return _gpu.split_over_gpus(gpus, q, one)

    # --- persistence --------------------------------------------------------------------------------------

    @staticmethod
    def sidecar_path(path: Path) -> Path:
        return sidecar_path(path)

    def save(self, path: Path) -> None:
        """Write the faiss index to `path` and the sidecar (describe() + statistics) to `path` + ".json"."""
        # A plain write, as the sidecar's (see `indexes.sidecar.write_sidecar` for why that suffices).
        faiss.write_index(self._index, str(path))
        write_sidecar(Path(path), self.describe(), self._stats)

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool = False) -> FaissBackend:
        path = Path(path)
        desc, stats = read_sidecar(path)
        factory = desc["factory"]
        if cls is not FaissBackend and factory != cls.factory:
            raise IndexFileError(f"{path} holds a {factory!r} index, the kind {cls.kind!r} expects {cls.factory!r}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise IndexFileError(f"{path} cannot be read as a faiss index ({faiss_message(e)})") from None
        if index.d != desc["dim"] or index.ntotal != desc["ntotal"] or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFileError(f"{path} holds {index.ntotal} x {index.d} rows (metric {index.metric_type}); its "
                                 f"sidecar says {desc['ntotal']} x {desc['dim']}, inner product")
        if structure_of(index) is not Structure.OPAQUE and index.is_trained:
            lists = int(find_ivf(index).nlist) if structure_of(index) is Structure.IVF else 1
            if stats is None or len(stats.count) != lists or int(stats.count.sum()) != index.ntotal:
                raise IndexFileError(f"{sidecar_path(path)} does not describe the {index.ntotal} rows in {lists} "
                                     f"lists of {path}")
        return cls(index, factory, use_gpu=use_gpu, gpu_float16=bool(desc.get("gpu_float16", True)),
                   search_params=desc.get("search_params") or None, stats=stats,
                   sq_range_expansion=float(desc.get("sq_range_expansion", DEFAULT_SQ_RANGE_EXPANSION)))
