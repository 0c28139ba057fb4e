"""Any FAISS index built from a factory string ("Flat", "IVF4096,SQ8", "IVF4096,PQ64", "HNSW32,Flat", ...),
metric inner product, with the bookkeeping that lets `indexes.exact.search_exact` certify its answers.

Registry kind: "faiss" (factory "Flat") or "faiss:<factory>" (e.g. "faiss:IVF1024,SQ8"); the kind string alone
recreates the backend, so the index manifest's `index_kind` is enough to reopen it. `describe()` gives the
same facts (and a few more) as a JSON-able dict; `FaissBackend.from_description` rebuilds an empty backend.

Files written by `save(path)`:
    path               the faiss index (faiss.write_index; readable by any faiss)
    path + ".json"     the sidecar: describe() plus the per-list statistics behind the certificates

Certificates. `search_candidates(queries, k', params)` returns an approximate top-k' *and* `bound[q]`, an upper
bound on the exact score q.x of every row x it did not return. Three structures are understood:

* IVF with Flat, SQ or PQ codes (IndexIVFFlat, IndexIVFScalarQuantizer, IndexIVFPQ). The backend picks the
  nprobe lists of highest centroid score itself (float64 scores) and scans them with `search_preassigned`,
  so which lists were scanned is known, not guessed. For a row x in list j with centroid c_j (the one faiss
  stored x under: the list number is read back from x's own code, see `add`):
    - list j not probed:  q.x = q.c_j + q.(x - c_j) <= q.c_j + ||q|| r_j,   r_j = max_{x in j} ||x - c_j||
      (Cauchy-Schwarz), and, the tighter one when rows lie near a sphere, the cone bound
      q.x = ||q|| ||x|| cos(angle(q, x)) <= ||q|| rho_j cos(max(0, phi_j - theta_j)), with
      phi_j = angle(q, c_j), theta_j = max_{x in j} angle(x, c_j), rho_j = max_{x in j} ||x||: by the
      triangle inequality for angles, angle(q, x) >= phi_j - theta_j, and cos decreases on [0, pi]
      (when that cosine is negative, q.x <= 0 and 0 is used). The minimum of the two is used.
    - list j probed, x not returned: faiss scored x from its code as s~(x) <= s~_k' (the k'-th returned
      score: the scan keeps the best k'), |s~(x) - q.xhat| <= E(q) (float32 rounding, below), and
      q.x = q.xhat + q.(x - xhat) <= s~(x) + E(q) + ||q|| eps_j,  eps_j = max_{x in j} ||x - xhat||, where
      xhat = sa_decode(code) is the reconstruction (centroid + decoded residual for residual codes).
      If fewer than k' rows came back, every row of the probed lists was returned: that part is -inf.
  bound[q] = max of the two parts.
* Flat codes scanned whole (IndexFlat, IndexScalarQuantizer, IndexPQ): every row is scored, so
  bound = s~_k' + E(q) + ||q|| eps (-inf when k' >= ntotal).
* Anything else (HNSW, fast-scan PQ, refine and pre-transform chains): no bound is known, +inf.

E(q) bounds float32 rounding in faiss's score: any n-term float32 dot product is within gamma_n sum|q_i y_i|
<= gamma_n ||q|| ||y|| of the real one (Higham, Accuracy and Stability, Thm 3.1, any summation order), with
gamma_n = n u / (1 - n u), u = 2^-24. Residual codes sum the centroid and residual terms, and decoding
rounds too, so E(q) = 2 gamma_{D+2} ||q|| S, with S = max over stored rows of ||c_j|| + ||xhat - c_j||
(>= ||xhat||). On a GPU with float16 flat storage the query is rounded to float16 as well, which adds
||qhat - q|| max||xhat|| <= (2^-11 ||q|| + sqrt(D) 2^-25) max||xhat|| and uses the float16 storage error as eps.
All statistics are computed in float64 from the float32 rows and inflated by a relative 1e-9 (angles by
1e-6 rad) to absorb their own rounding.

How tight this is, measured (tests/test_ann.py; a 10^5 x 128 benchmark): codes scanned in full certify
nearly every image query (Flat, SQfp16: 100%; SQ8: 92% / 99.4% / 100% with 32 / 64 (default) / 128
candidates); IVF lists do not: each name has its own component in a direction no list summary predicts,
so list bounds exceed the best score by ~0.7 and IVF certifies ~0% of out-of-distribution (image) queries,
which then fall back to brute force. The same bounds certify 90-100% of queries on clustered rows or text-like queries.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np

# `_flat.faiss_gpu_count` is looked up at call time, so tests can patch it in one place.
from . import flat as _flat
from .base import (
    Candidates,
    IndexFileError,
    IndexNotTrainedError,
    IndexSpecError,
    SearchParamsError,
    as_vectors,
    sort_topk,
)
from .registry import register_backend

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "idia-engine faiss sidecar"
SIDECAR_VERSION = 1
_U32 = 2.0 ** -24  # unit roundoff of float32
_REL_INFLATE = 1e-9  # relative inflation of float64 statistics
_ANGLE_SLACK = 1e-6  # radians: covers arccos rounding near 0 and pi
# Scalar quantizers train per-dimension [min, max] ranges on the sample and clip rows outside them; the
# clipped rows set the worst-case code error the certificate must use (0.10 instead of 0.011 for SQ8 at
# dim 128). Widening each range by 20% of its width on both sides removes the clipping for a 1.4x larger
# typical error (faiss ScalarQuantizer.rangestat_arg with RS_minmax).
DEFAULT_SQ_RANGE_EXPANSION = 0.2
_ADD_BLOCK = 65_536  # rows encoded (and measured in float64) at once by `add`
_GPU_MAX_K = 2048  # faiss GPU k-selection limit (k and nprobe)
_PROBE_DIM = 3840  # 2^8 * 15: divisible by every usual PQ m, so a factory check is dimension-agnostic
_IVF_CODES = {"IndexIVFFlat", "IndexIVFScalarQuantizer", "IndexIVFPQ"}
_FLAT_CODES = {"IndexFlat", "IndexScalarQuantizer", "IndexPQ"}


class Structure(str, Enum):
    """What the certificate can rely on."""

    IVF = "ivf"  # inverted lists with decodable codes: per-list bounds
    CODES = "codes"  # every row scored from a decodable code
    OPAQUE = "opaque"  # no bound (HNSW graphs, fast-scan, chains): certificates are +inf


def gamma(n: int) -> float:
    """Higham's gamma_n for float32: |fl(x.y) - x.y| <= gamma_n sum|x_i y_i| for an n-term dot product."""
    return n * _U32 / (1 - n * _U32)


def _faiss_message(e: Exception) -> str:
    """The useful last part of a faiss RuntimeError ("Error in ... at file.cpp:123: Error: '...' failed: X")."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = re.sub(r"^Error in .*? at \S+:\d+: ", "", msg)
    msg = re.sub(r"^Error: '.*?' failed:? ?", "", msg)
    return msg or str(e).splitlines()[0]


def _build_cpu_index(factory: str, dim: int) -> faiss.Index:
    if not isinstance(factory, str) or not factory.strip():
        raise IndexSpecError(f"faiss factory string must be a non-empty string, got {factory!r}")
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except (RuntimeError, AssertionError) as e:  # faiss: RuntimeError with a C++ trace; swig: AssertionError
        raise IndexSpecError(f"faiss factory string {factory!r} cannot build an index of dimension {dim}: "
                             f"{_faiss_message(e)}") from None


def _type_name(index: faiss.Index) -> str:
    name = type(index).__name__
    return "IndexFlat" if name in ("IndexFlatIP", "IndexFlatL2") else name  # read_index gives the subclass


def _structure(index: faiss.Index) -> Structure:
    name = _type_name(index)
    if name in _IVF_CODES and index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return Structure.IVF
    if name in _FLAT_CODES and index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return Structure.CODES
    return Structure.OPAQUE


def _is_hnsw(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexHNSW)


def _find_ivf(index: faiss.Index) -> Any:
    """The IndexIVF inside `index` (itself, or under a pre-transform), or None."""
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # faiss raises when there is none
        return None


def _default_nprobe(nlist: int) -> int:
    return int(min(nlist, max(8, nlist // 32)))


def _listnos(codes: np.ndarray, nbytes: int) -> np.ndarray:
    """List numbers of IVF standalone codes: the first `nbytes` bytes, little-endian (faiss encode_listno)."""
    out = np.zeros(len(codes), np.int64)
    for b in range(nbytes):
        out |= codes[:, b].astype(np.int64) << (8 * b)
    return out


def _norms64(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x))


@dataclass
class _Stats:
    """What the certificates need, gathered while adding (all float64; see the module docstring).

    IVF: one entry per list; CODES: arrays of length 1 (the whole index is one "list")."""

    radius: np.ndarray  # max ||x - c_j|| (IVF), -inf for an empty list
    cos_min: np.ndarray  # min cos(x, c_j) over nonzero members (IVF), +inf for none
    rho: np.ndarray  # max ||x||, -inf for an empty list
    eps: np.ndarray  # max ||x - xhat|| (code reconstruction error)
    count: np.ndarray  # int64 rows per list
    scale: float = 0.0  # max ||c_j|| + ||xhat - c_j|| (>= ||xhat||): the E(q) magnitude
    eps16: float = 0.0  # max ||x - float16(x)|| (GPU float16 flat storage)
    norm16: float = 0.0  # max ||float16(x)||

    @classmethod
    def empty(cls, nlists: int) -> _Stats:
        return cls(radius=np.full(nlists, -np.inf), cos_min=np.full(nlists, np.inf),
                   rho=np.full(nlists, -np.inf), eps=np.zeros(nlists), count=np.zeros(nlists, np.int64))

    def to_json(self) -> dict[str, Any]:
        def enc(a: np.ndarray) -> list:
            # JSON has no infinities: None stands for the array's neutral value (-inf or +inf).
            return [None if not math.isfinite(v) else float(v) for v in a.tolist()]

        return {"radius": enc(self.radius), "cos_min": enc(self.cos_min), "rho": enc(self.rho),
                "eps": enc(self.eps), "count": self.count.tolist(),
                **{k: enc(np.array([getattr(self, k)]))[0] for k in ("scale", "eps16", "norm16")}}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> _Stats:
        def dec(values: list, neutral: float) -> np.ndarray:
            return np.array([neutral if v is None else v for v in values], np.float64)

        return cls(radius=dec(obj["radius"], -np.inf), cos_min=dec(obj["cos_min"], np.inf),
                   rho=dec(obj["rho"], -np.inf), eps=dec(obj["eps"], 0.0),
                   count=np.asarray(obj["count"], np.int64),
                   **{k: np.inf if obj[k] is None else float(obj[k]) for k in ("scale", "eps16", "norm16")})


@dataclass
class _GpuCopy:
    """Per-device clones of the CPU index (queries are split across them; each call gets its own params).

    faiss's IndexReplicas (index_cpu_to_all_gpus) rejects per-call SearchParameters and has no
    search_preassigned, so the replicas are kept as a list of single-device indexes instead."""

    resources: list = field(default_factory=list)  # StandardGpuResources, one per device (kept alive)
    indexes: list = field(default_factory=list)  # one GPU index per device
    float16_storage: bool = False  # flat storage in float16 (GpuClonerOptions.useFloat16)
    float16_luts: bool = False  # IVFPQ lookup tables in float16


def _clone_to_gpus(index: faiss.Index, structure: Structure, float16_flat: bool) -> _GpuCopy:
    copy = _GpuCopy()
    is_flat = _type_name(index) == "IndexFlat"
    is_pq = type(index).__name__ == "IndexIVFPQ"
    for dev in range(_flat.faiss_gpu_count()):
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = bool(float16_flat and is_flat)
        co.allowCpuCoarseQuantizer = True  # e.g. an HNSW coarse quantizer: lists are chosen by us anyway
        co.use_cuvs = False  # the classic kernels implement search_preassigned
        try:
            gpu = faiss.index_cpu_to_gpu(res, dev, index, co)
        except RuntimeError:
            if not is_pq:
                raise
            co.useFloat16 = True  # large PQ codes need float16 lookup tables (shared memory)
            gpu = faiss.index_cpu_to_gpu(res, dev, index, co)
            copy.float16_luts = True
        copy.resources.append(res)
        copy.indexes.append(gpu)
    copy.float16_storage = bool(float16_flat and is_flat)
    return copy


@register_backend
class FaissBackend:
    """A faiss index from a factory string, inner-product metric, with certificate bookkeeping.

    Build: `create(dim, factory=...)`, then `train(sample)` if `needs_training`, then `add` in chunks (row ids
    continue from `ntotal`). The CPU index is the master copy; with `use_gpu` a GPU copy is cloned lazily
    before the first search after a change."""

    kind: ClassVar[str] = "faiss"
    file_suffix: ClassVar[str] = ".faiss"
    factory: ClassVar[str] = "Flat"  # the factory string of this (possibly bound) class
    _bound_classes: ClassVar[dict[str, type]] = {}

    def __init__(self, index: faiss.Index, factory: str, *, use_gpu: bool = False, gpu_float16: bool = True,
                 search_params: Mapping[str, Any] | None = None, stats: _Stats | None = None,
                 sq_range_expansion: float = DEFAULT_SQ_RANGE_EXPANSION):
        self._index = index
        self._factory = factory
        self._sq_range_expansion = float(sq_range_expansion)
        self._structure = _structure(index)
        self._any_ivf = _find_ivf(index)  # for search parameters, whatever the structure
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
        self._default_params = dict(search_params or {})
        if self._any_ivf is not None and "nprobe" not in self._default_params:
            self._default_params["nprobe"] = _default_nprobe(self._any_ivf.nlist)
        self._check_params(self._default_params, what="default search parameters")
        self._gpu: _GpuCopy | None = None
        self._want_gpu = self._decide_gpu(use_gpu)
        if self._structure is Structure.OPAQUE:
            log.info("faiss index %r gives no score bound: exact search falls back to brute force for it",
                     factory)

    # --- construction -----------------------------------------------------------------------------------

    @classmethod
    def with_spec(cls, factory: str) -> type[FaissBackend]:
        """The class bound to one factory string: kind "faiss:<factory>" (checked for syntax here)."""
        factory = factory.strip()
        if factory not in cls._bound_classes:
            try:  # fail fast on a string faiss cannot parse, before any model is loaded
                _build_cpu_index(factory, _PROBE_DIM)
            except IndexSpecError as e:
                detail = str(e).lower()
                if "dimension of the vector" not in detail and "multiple" not in detail:
                    raise IndexSpecError(f"faiss factory string {factory!r} is not valid: "
                                         f"{str(e).split(': ', 1)[-1]}") from None
            cls._bound_classes[factory] = type(f"FaissBackend[{factory}]", (FaissBackend,),
                                               {"kind": f"faiss:{factory}", "factory": factory})
        return cls._bound_classes[factory]

    @classmethod
    def create(cls, dim: int, *, use_gpu: bool = False, factory: str | None = None, gpu_float16: bool = True,
               search_params: Mapping[str, Any] | None = None,
               sq_range_expansion: float = DEFAULT_SQ_RANGE_EXPANSION) -> FaissBackend:
        """An empty index. `factory` defaults to the class's; a bound class accepts only its own.

        gpu_float16: on a GPU, flat indexes store float16 (half the memory; the certificate accounts for it).
        search_params: default per-call parameters (e.g. {"nprobe": 64}); per-call ones override them.
        sq_range_expansion: widening of scalar-quantizer ranges at training (see DEFAULT_SQ_RANGE_EXPANSION)."""
        factory = cls._resolve_factory(factory)
        return cls(_build_cpu_index(factory, dim), factory, use_gpu=use_gpu, gpu_float16=gpu_float16,
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
            "index_type": _type_name(self._index),
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
        if _flat.faiss_gpu_count() == 0:
            log.warning("GPU search asked for, but faiss sees no GPU: searching on the CPU (%s)", self._factory)
            return False
        if _is_hnsw(self._index):
            log.warning("faiss has no GPU version of HNSW indexes: searching %r on the CPU", self._factory)
            return False
        return True

    def _gpu_indexes(self) -> list | None:
        """The GPU clones, made on first use after a change; None when searching on the CPU."""
        if not self._want_gpu or self.ntotal == 0:
            return None
        if self._gpu is None:
            try:
                self._gpu = _clone_to_gpus(self._index, self._structure, self._gpu_float16)
            except (RuntimeError, AttributeError) as e:  # AttributeError: a faiss build without GPU support
                log.warning("cannot clone faiss index %r to the GPU (%s): searching on the CPU",
                            self._factory, _faiss_message(e))
                self._want_gpu = False
                return None
        return self._gpu.indexes

    def _init_stats(self) -> None:
        self._stats = _Stats.empty(int(self._ivf.nlist) if self._ivf is not None else 1)

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
        if getattr(pq_owner, "do_polysemous_training", False):
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
                log.warning("IVF training on the GPU failed to start (%s): training on the CPU", _faiss_message(e))
                clustering = None
        try:
            self._index.train(x)
        except RuntimeError as e:
            raise IndexNotTrainedError(f"training faiss index {self._factory!r} on {len(x)} rows failed: "
                                       f"{_faiss_message(e)}") from None
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
        st = self._stats
        err = _norms64(x64 - xhat)
        xn = _norms64(x64)
        if self._structure is Structure.IVF:
            lists = _listnos(codes, int(self._ivf.coarse_code_size()))
            c = self._centroids[lists].astype(np.float64)
            cn = _norms64(c)
            st.scale = max(st.scale, float((cn + _norms64(xhat - c)).max()), float(_norms64(xhat).max()))
            with np.errstate(invalid="ignore", divide="ignore"):
                cos = np.einsum("ij,ij->i", x64, c) / (xn * cn)
            cos[(xn == 0) | (cn == 0)] = np.inf  # a zero row scores 0; a zero centroid has no cone
            np.maximum.at(st.radius, lists, _norms64(x64 - c))
            np.minimum.at(st.cos_min, lists, cos)
            np.maximum.at(st.rho, lists, xn)
            np.maximum.at(st.eps, lists, err)
            np.add.at(st.count, lists, 1)
        else:
            st.scale = max(st.scale, float(_norms64(xhat).max()))
            st.rho[0] = max(st.rho[0], float(xn.max()))
            st.eps[0] = max(st.eps[0], float(err.max()))
            st.count[0] += len(x)
            if _type_name(self._index) == "IndexFlat":
                with np.errstate(over="ignore"):
                    x16 = x.astype(np.float16).astype(np.float64)
                st.eps16 = max(st.eps16, float(_norms64(x64 - x16).max()))
                st.norm16 = max(st.norm16, float(_norms64(x16).max()))
        self._index.add_sa_codes(codes)

    # --- search parameters --------------------------------------------------------------------------------

    def _allowed_params(self) -> dict[str, type]:
        if self._any_ivf is not None:
            allowed = {"nprobe": int, "max_codes": int}
            if _is_hnsw(self._any_ivf.quantizer):
                allowed["quantizer_efSearch"] = int
            return allowed
        if self._hnsw() is not None:
            return {"efSearch": int, "check_relative_distance": bool, "bounded_queue": bool}
        return {}

    def _check_params(self, params: Mapping[str, Any], *, what: str = "search parameters") -> dict[str, Any]:
        allowed = self._allowed_params()
        for key, value in params.items():
            if key not in allowed:
                valid = ", ".join(sorted(allowed)) or "none"
                raise SearchParamsError(f"{what}: faiss index {self._factory!r} takes no search parameter {key!r} "
                                        f"(valid: {valid})")
            typ = allowed[key]
            if typ is int and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
                raise SearchParamsError(f"{what}: {key} must be a non-negative integer, got {value!r}")
            if typ is bool and not isinstance(value, (bool, np.bool_)):
                raise SearchParamsError(f"{what}: {key} must be true or false, got {value!r}")
        if "nprobe" in params and not 1 <= int(params["nprobe"]) <= int(self._ivf_nlist()):
            raise SearchParamsError(f"{what}: nprobe must be in 1..{self._ivf_nlist()} (the number of lists), "
                                    f"got {params['nprobe']!r}")
        if "efSearch" in params and int(params["efSearch"]) < 1:
            raise SearchParamsError(f"{what}: efSearch must be >= 1, got {params['efSearch']!r}")
        return dict(params)

    def _hnsw(self) -> Any:
        """The HNSW index inside (itself, or under pre-transform / refine layers), or None."""
        index = faiss.downcast_index(self._index)
        while isinstance(index, (faiss.IndexPreTransform, faiss.IndexRefine)):
            index = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform)
                                         else index.base_index)
        return index if isinstance(index, faiss.IndexHNSW) else None

    def _ivf_nlist(self) -> int:
        return int(self._any_ivf.nlist)

    def _effective_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        merged = dict(self._default_params)
        merged.update(self._check_params(params or {}))
        return merged

    def _search_parameters(self, params: Mapping[str, Any]) -> tuple[Any, list]:
        """A faiss SearchParameters object for one call (and the objects it points to, kept alive), wrapped
        for the pre-transform and refine layers above the index it is meant for."""
        sp, keep = self._inner_search_parameters(params)
        return (_wrap_params(self._index, sp, keep) if sp is not None else None), keep

    def _inner_search_parameters(self, params: Mapping[str, Any]) -> tuple[Any, list]:
        if not params:
            return None, []
        if "nprobe" in params or "max_codes" in params or "quantizer_efSearch" in params:
            sp = faiss.SearchParametersIVF()
            keep: list = [sp]
            if "nprobe" in params:
                sp.nprobe = int(params["nprobe"])
            if "max_codes" in params:
                sp.max_codes = int(params["max_codes"])
            if "quantizer_efSearch" in params:
                qp = faiss.SearchParametersHNSW()
                qp.efSearch = int(params["quantizer_efSearch"])
                sp.quantizer_params = qp
                keep.append(qp)
            return sp, keep
        sp = faiss.SearchParametersHNSW()
        if "efSearch" in params:
            sp.efSearch = int(params["efSearch"])
        if "check_relative_distance" in params:
            sp.check_relative_distance = bool(params["check_relative_distance"])
        if "bounded_queue" in params:
            sp.bounded_queue = bool(params["bounded_queue"])
        return sp, [sp]

    # --- search -------------------------------------------------------------------------------------------

    def _split_over_gpus(self, gpus: list, q: np.ndarray, fn) -> tuple[np.ndarray, np.ndarray]:
        """Run fn(index, rows) on contiguous query slices, one per GPU, and stack the results."""
        if len(gpus) == 1 or len(q) < 2 * len(gpus):
            return fn(gpus[0], slice(0, len(q)))
        step = -(-len(q) // len(gpus))
        slices = [slice(i, min(i + step, len(q))) for i in range(0, len(q), step)]
        with ThreadPoolExecutor(len(slices)) as pool:  # faiss releases the GIL
            parts = list(pool.map(lambda a: fn(*a), zip(gpus, slices)))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _raw_search(self, q: np.ndarray, k: int, params: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        sp, _keep = self._search_parameters(params)  # _keep: objects sp points to, alive until we return
        gpus = self._gpu_indexes()
        if gpus is None:
            return self._index.search(q, k, params=sp)

        def one(index, rows):
            return index.search(q[rows], k, params=sp)

        if params.get("max_codes"):
            raise SearchParamsError("max_codes is not supported by faiss GPU indexes; search on the CPU")
        return self._split_over_gpus(gpus, q, one)

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k: (scores float32 [Q, k'], ids int64 [Q, k']), k' = min(k, ntotal), rows ordered by
        `sort_topk`; where the index found fewer than k' rows, ids are -1 and scores -inf (at the end)."""
        q = as_vectors(queries, self.dim, what="queries")
        eff = self._effective_params(params)
        k = min(int(k), self.ntotal)
        if k < 1 or len(q) == 0:
            return np.zeros((len(q), max(k, 0)), np.float32), np.zeros((len(q), max(k, 0)), np.int64)
        scores, ids = self._raw_search(q, k, eff)
        scores, ids = _clean(scores, ids)
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
            return Candidates(np.zeros((nq, max(k, 0)), np.float32), np.zeros((nq, max(k, 0)), np.int64), bound)
        if self._structure is Structure.OPAQUE:
            scores, ids = _clean(*self._raw_search(q, k, eff))
            everything = (k >= self.ntotal) & (ids[:, -1] >= 0)  # every row came back
            return Candidates(scores, ids, np.where(everything, -np.inf, np.inf))
        if eff.get("max_codes"):
            raise SearchParamsError("max_codes leaves probed lists partly unscanned, so no bound holds; "
                                    "drop it for certified search")
        qn = _norms64(q.astype(np.float64))
        if self._structure is Structure.CODES:
            scores, ids = _clean(*self._raw_search(q, k, {}))
            return Candidates(scores, ids, self._codes_bound(scores, ids, qn))
        return self._ivf_candidates(q, qn, k, int(eff["nprobe"]))

    def _float_slack(self, qn: np.ndarray) -> np.ndarray:
        return 2.0 * gamma(self.dim + 2) * qn * self._stats.scale * (1 + _REL_INFLATE) + 1e-30

    def _codes_bound(self, scores: np.ndarray, ids: np.ndarray, qn: np.ndarray) -> np.ndarray:
        st = self._stats
        if self._gpu is not None and self._want_gpu and self._gpu.float16_storage:
            qerr = (2.0 ** -11 * qn + math.sqrt(self.dim) * 2.0 ** -25) * st.norm16
            slack = 2.0 * gamma(self.dim + 2) * qn * st.norm16 + qerr + qn * st.eps16
        else:
            slack = self._float_slack(qn) + qn * st.eps[0]
        bound = scores[:, -1].astype(np.float64) + slack * (1 + _REL_INFLATE)
        everything = (ids[:, -1] < 0) | (ids.shape[1] >= self.ntotal)
        return np.where(everything, -np.inf, bound)

    def list_upper_bounds(self, queries: np.ndarray) -> np.ndarray:
        """float64 [Q, nlist]: an upper bound on q.x over the members of each list (-inf for empty lists)."""
        q64 = as_vectors(queries, self.dim, what="queries").astype(np.float64)
        return self._list_ub(q64, _norms64(q64), q64 @ self._centroids.astype(np.float64).T)

    def _list_ub(self, q64: np.ndarray, qn: np.ndarray, cs: np.ndarray) -> np.ndarray:
        st = self._stats
        c64 = self._centroids.astype(np.float64)
        cn = _norms64(c64)
        radius = st.radius * (1 + _REL_INFLATE)
        ball = cs + qn[:, None] * radius[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            cos_phi = np.clip(cs / (qn[:, None] * cn[None, :]), -1.0, 1.0)
            phi = np.arccos(cos_phi)
            theta = np.arccos(np.clip(st.cos_min, -1.0, 1.0)) + _ANGLE_SLACK
            psi = np.maximum(phi - theta[None, :] - _ANGLE_SLACK, 0.0)
            cone = qn[:, None] * (st.rho * (1 + _REL_INFLATE))[None, :] * np.maximum(np.cos(psi), 0.0)
        no_cone = ~np.isfinite(cone) | (cn[None, :] == 0) | (qn[:, None] == 0) | ~np.isfinite(st.cos_min)[None, :]
        cone = np.where(no_cone, np.inf, cone)
        ub = np.minimum(ball, cone)
        ub = ub + _REL_INFLATE * (np.abs(ub) + qn[:, None] * (cn + radius)[None, :]) + 1e-30
        return np.where((st.count > 0)[None, :], ub, -np.inf)

    def _ivf_candidates(self, q: np.ndarray, qn: np.ndarray, k: int, nprobe: int) -> Candidates:
        ivf = self._ivf
        nq, nlist = len(q), int(ivf.nlist)
        q64 = q.astype(np.float64)
        cs = q64 @ self._centroids.astype(np.float64).T  # exact centroid scores (faiss adds them for residuals)
        ub = self._list_ub(q64, qn, cs)
        nprobe = min(nprobe, nlist)
        if nprobe < nlist:
            # faiss's own choice (highest centroid score). Probing by highest bound was tried: on
            # out-of-distribution queries it lowers recall (0.24 vs 0.60 at nprobe 8/64) and certifies no more.
            probe = np.argpartition(-cs, nprobe - 1, axis=1)[:, :nprobe]
        else:
            probe = np.broadcast_to(np.arange(nlist), (nq, nlist)).copy()
        probe = np.ascontiguousarray(probe, dtype=np.int64)
        coarse = np.ascontiguousarray(np.take_along_axis(cs, probe, 1), dtype=np.float32)
        scores, ids = self._preassigned(q, k, probe, coarse)
        scores, ids = _clean(scores, ids)
        left = ub.copy()
        np.put_along_axis(left, probe, -np.inf, axis=1)
        unprobed = left.max(axis=1)
        probed_eps = np.take_along_axis(np.broadcast_to(self._stats.eps, ub.shape), probe, 1).max(axis=1)
        slack = self._float_slack(qn) + qn * probed_eps * (1 + _REL_INFLATE)
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
        if gpus is None or k > _GPU_MAX_K or probe.shape[1] > _GPU_MAX_K:
            return one(self._ivf, slice(0, len(q)))
        return self._split_over_gpus(gpus, q, one)

    # --- persistence --------------------------------------------------------------------------------------

    @staticmethod
    def sidecar_path(path: Path) -> Path:
        path = Path(path)
        return path.with_name(path.name + ".json")

    def save(self, path: Path) -> None:
        """Write the faiss index to `path` and the sidecar (describe() + statistics) to `path` + ".json"."""
        path = Path(path)
        faiss.write_index(self._index, str(path))
        sidecar = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "description": self.describe(),
                   "stats": self._stats.to_json() if self._stats is not None else None}
        target = self.sidecar_path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(sidecar, allow_nan=False), encoding="utf-8")
        os.replace(tmp, target)

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool = False) -> FaissBackend:
        path = Path(path)
        side = cls.sidecar_path(path)
        if not side.is_file():
            raise IndexFileError(f"{side} is missing: a faiss index saved by idia-engine has a sidecar beside it")
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
            desc = meta["description"]
        except (ValueError, KeyError, TypeError) as e:
            raise IndexFileError(f"{side} is not a valid sidecar ({e})") from None
        if meta.get("format") != SIDECAR_FORMAT or meta.get("version") != SIDECAR_VERSION:
            raise IndexFileError(f"{side} is not a version-{SIDECAR_VERSION} idia-engine faiss sidecar")
        factory = desc["factory"]
        if cls is not FaissBackend and factory != cls.factory:
            raise IndexFileError(f"{path} holds a {factory!r} index, the kind {cls.kind!r} expects {cls.factory!r}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise IndexFileError(f"{path} cannot be read as a faiss index ({_faiss_message(e)})") from None
        if index.d != desc["dim"] or index.ntotal != desc["ntotal"] or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFileError(f"{path} holds {index.ntotal} x {index.d} rows (metric {index.metric_type}); its "
                                 f"sidecar says {desc['ntotal']} x {desc['dim']}, inner product")
        try:
            stats = _Stats.from_json(meta["stats"]) if meta.get("stats") else None
        except (KeyError, TypeError, ValueError) as e:
            raise IndexFileError(f"{side} has unreadable statistics ({e})") from None
        if _structure(index) is not Structure.OPAQUE and index.is_trained:
            ivf = _find_ivf(index)
            lists = int(ivf.nlist) if _structure(index) is Structure.IVF else 1
            if stats is None or len(stats.count) != lists or int(stats.count.sum()) != index.ntotal:
                raise IndexFileError(f"{side} does not describe the {index.ntotal} rows in {lists} lists of {path}")
        backend = cls(index, factory, use_gpu=use_gpu, gpu_float16=bool(desc.get("gpu_float16", True)),
                      search_params=desc.get("search_params") or None, stats=stats,
                      sq_range_expansion=float(desc.get("sq_range_expansion", DEFAULT_SQ_RANGE_EXPANSION)))
        return backend


def _wrap_params(index: faiss.Index, sp: Any, keep: list) -> Any:
    """SearchParameters for `index` that carry `sp` down to the IVF or HNSW index inside it."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = _wrap_params(index.index, sp, keep)
    elif isinstance(index, faiss.IndexRefine):
        outer = faiss.IndexRefineSearchParameters()
        outer.base_index_params = _wrap_params(index.base_index, sp, keep)
    else:
        return sp
    keep.append(outer)
    return outer


def _clean(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss pads missing results with id -1 and score -FLT_MAX (inner product): make those -inf."""
    ids = ids.astype(np.int64, copy=False)
    scores = np.where(ids < 0, np.float32(-np.inf), scores).astype(np.float32, copy=False)
    return scores, ids
