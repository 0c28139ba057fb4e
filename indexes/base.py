"""The interface of index kinds, and the errors and vector door every index shares (re-exported here).

An index kind (`IndexKind`, classmethods only) says how the T per-template indexes of a build directory are
built and searched. Most kinds are `NameIndexBackend`s: one index per template, holding that template's
L2-normalised text embeddings (one row per candidate name) and answering top-k maximum-inner-product
queries; exact kinds answer by themselves, the others are re-ranked against the raw rows and certified
(`indexes.exact`). A kind may instead search all templates at once (the template ensemble).
Search parameters (nprobe, efSearch, ...) travel with each call; they are never set on a shared index.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from idia_engine.engine.errors import ArtifactError, InputError

from .bounds import stored_rows_bound
from .errors import (
    IndexFileError,
    IndexNotTrainedError,
    IndexSpecError,
    SearchParamsError,
    UnknownBackendError,
    VectorFormatError,
)
from .exact import Exactness, brute_force_device, exact_topk, max_row_norm, search_exact
from .vectors import Candidates, as_vectors, sort_topk

__all__ = ["FILL_CHUNK", "TRAIN_SEED", "Candidates", "IndexData", "IndexFileError", "IndexKind",
           "IndexNotTrainedError", "IndexSpecError", "NameIndexBackend", "SearchParamsError", "TemplateSearchResult",
           "TemplateSearcher", "UnknownBackendError", "VectorFormatError", "as_vectors", "sort_topk",
           "template_file", "vectors_file"]

FILL_CHUNK = 65536  # rows read back from a template's vectors file and added at once while building
TRAIN_SEED = 0  # seeds the training sample, so a rebuild trains the same index


def template_file(t: int, suffix: str) -> str:
    """File name of template t's index in a build directory."""
    return f"template_{t:02d}{suffix}"


def vectors_file(t: int) -> str:
    """File name of template t's raw float32 rows [N, D] (.npy) in a build directory."""
    return f"vectors_{t:02d}.npy"


class IndexData(Protocol):
    """A built index as the engine opened it (its NameIndex): what searchers read templates through."""

    @property
    def data_dir(self) -> Path: ...

    @property
    def num_templates(self) -> int: ...

    def load_template(self, t: int, *, use_gpu: bool = False) -> NameIndexBackend:
        """Template t's backend, checked against the manifest's size and dimension."""

    def vectors(self, t: int) -> np.ndarray:
        """Raw float32 rows [N, D] of template t, memory-mapped or read on demand (`IndexKind.raw_rows`)."""


# queries float32 [m, D], k -> the exact (scores float32 [m, k'], ids int64 [m, k']) over all of a template's
# names, ordered by sort_topk (k' = min(k, N)).
Resolver = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class TemplateSearchResult:
    """Top-k per query and template, and how each (query, template) answer was obtained."""

    templates: tuple[int, ...]  # the templates answered; axis 1 of every array below
    scores: np.ndarray  # float32 [Q, G, k], each row ordered by sort_topk
    ids: np.ndarray  # int64 [Q, G, k]
    exact_by_index: np.ndarray  # bool [Q, G]: the kind answered exactly by itself (flat, dense)
    certified: np.ndarray  # bool [Q, G]: the re-ranked top-1 is proved to be the exact arg-max
    fell_back: np.ndarray  # bool [Q, G]: answered by brute force

    @property
    def uncertified_kept(self) -> np.ndarray:
        """bool [Q, G]: answers not known to be exact (only without fallback)."""
        return ~(self.exact_by_index | self.certified | self.fell_back)


class TemplateSearcher(Protocol):
    """Answers queries for some templates of an opened index."""

    @property
    def templates(self) -> tuple[int, ...]: ...

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None, fallback: bool
               ) -> TemplateSearchResult:
        """Top-k of `queries` [Q, D] per template; fallback: brute force for answers not certified."""


class IndexKind(ABC):
    """How the T per-template indexes of one kind are built into a build directory and searched."""

    kind: ClassVar[str]  # registry key, recorded in the index manifest
    exact_search: ClassVar[bool] = False  # answers exactly by itself: no raw vectors kept, no re-ranking

    @classmethod
    def with_spec(cls, spec: str) -> type[IndexKind]:
        """The kind "<kind>:<spec>"; kinds that take no spec refuse one."""
        raise UnknownBackendError(f"index kind {cls.kind!r} takes no spec, got {f'{cls.kind}:{spec}'!r}")

    @classmethod
    @abstractmethod
    def build_template(cls, t: int, rows: np.ndarray, out_dir: Path, *, use_gpu: bool,
                       search_params: Mapping[str, Any]) -> None:
        """Called by the engine's build right after template t's rows (float32 [N, D] memmap, L2-normalised)
        are on disk; writes whatever the kind keeps of template t into `out_dir`."""

    @classmethod
    def build_disk_bytes(cls, num_names: int, num_templates: int, dim: int) -> int:
        """Bytes a build of this kind writes at most (what `build-index` checks is free before it starts).
        Default, for kinds that do not say better: every template's raw float32 vectors and an index file as
        large beside each."""
        return 2 * num_names * num_templates * dim * 4

    @classmethod
    def store_raw_rows(cls, t: int, build_dir: Path) -> None:
        """Called after `build_template(t)`, before the build records template t as indexed: write whatever
        the kind keeps of the raw rows besides (or instead of) the vectors file (`keeps_vectors_file`); must be
        safe to call again on a resumed build. Default: nothing (the vectors file is kept or dropped)."""

    @classmethod
    def keeps_vectors_file(cls) -> bool:
        """Whether template t's raw float32 vectors file stays in the index once it is indexed. Exact kinds
        answer from their own rows; kinds that store the rows otherwise (`store_raw_rows`) say False too."""
        return not cls.exact_search

    @classmethod
    def raw_rows(cls, data_dir: Path, t: int) -> np.ndarray:
        """Template t's raw float32 rows [N, D] in a build or data directory, for re-ranking and the brute
        force: the memory-mapped vectors file (array-like rows, `SplitRows`, for kinds that keep them so)."""
        path = Path(data_dir) / vectors_file(t)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: index kind {cls.kind} needs the raw vectors for exact "
                                "re-ranking; rebuild the index")
        return np.load(path, mmap_mode="r")

    @classmethod
    def finish_build(cls, out_dir: Path, rows: Sequence[np.ndarray], *,
                     progress: Callable[[str, int, int], None]) -> None:
        """Called once after every template was built, with the T templates' raw rows (`raw_rows`; default:
        nothing)."""

    @classmethod
    @abstractmethod
    def open_searchers(cls, index: IndexData, *, use_gpu: bool) -> Iterator[TemplateSearcher]:
        """Searchers covering every template once, loaded one at a time as the iterator advances (the one
        before is released then), so memory holds one searcher's index."""

    @classmethod
    def hold_searchers(cls, index: IndexData, *, use_gpu: bool) -> list[TemplateSearcher]:
        """Searchers covering every template once, all loaded now and held until dropped: for a server that
        answers many requests (memory holds every template's index). Default: the iterator's, for kinds
        whose searchers are not released as it advances."""
        return list(cls.open_searchers(index, use_gpu=use_gpu))

    @classmethod
    def open_resolver(cls, index: IndexData, t: int, *, use_gpu: bool) -> Resolver:
        """Exact top-k over all of template t's names for any batch of queries: what the cells of a query
        brute-force through (`engine/query/settle.py`). Default: `exact_topk` over the raw float32 rows, a
        chunked GEMM (on the GPU when asked), with the rows' norm bound measured once on the first call."""
        rows = cls.stored_rows(index, t)
        norm: list[float] = []

        def resolve(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            norm[:] = norm or [max_row_norm(rows)]
            return exact_topk(rows, queries, k, row_norm=norm[0], use_gpu=use_gpu)

        return resolve

    @classmethod
    def resolver_label(cls, *, use_gpu: bool) -> str:
        """What `open_resolver` answers with, in a few words (for summary.json)."""
        return "float32 brute force" + (" on the GPU" if brute_force_device(use_gpu).type == "cuda" else "")

    @classmethod
    def resolve_in_one_pass(cls, *, use_gpu: bool) -> bool:
        """Whether cells should hand all their open photos to the resolver at once: True where a second call,
        which reads all the template's rows again, costs more than the photos round 1 would save (a bf16 scan),
        False where the cost is mostly per photo (the float32 GEMM: resolving only what round 1 needs saves)."""
        return False

    @classmethod
    def stored_rows(cls, index: IndexData, t: int) -> np.ndarray:
        """Template t's float32 rows [N, D] as the build stored them (L2-normalised; row i = name i): what its
        names are scored against. Default: the raw vectors file that kinds without exact search keep beside
        their index; exact kinds give the rows their index holds."""
        return index.vectors(t)


class NameIndexBackend(IndexKind):
    """Top-k inner-product search over the embeddings of one template (one index per template)."""

    file_suffix: ClassVar[str]  # suffix of the file `save` writes
    # Candidates beyond k that `search_exact` re-ranks for approximate kinds (None: DEFAULT_EXTRA_CANDIDATES):
    # a kind whose bound is tight needs few, and each costs a float64 re-score per query.
    extra_candidates: ClassVar[int | None] = None

    @classmethod
    @abstractmethod
    def create(cls, dim: int, *, use_gpu: bool = False,
               search_params: Mapping[str, Any] | None = None) -> NameIndexBackend:
        """An empty index of dimension `dim`; search_params: default per-call parameters (kinds without
        any refuse them)."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path, *, use_gpu: bool = False) -> NameIndexBackend: ...

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @property
    @abstractmethod
    def ntotal(self) -> int: ...

    @property
    def on_gpu(self) -> bool:
        """The index searches on a GPU (False where none was asked for or none could be used)."""
        return False

    @property
    def needs_training(self) -> bool:
        """`train(sample)` must come before `add`."""
        return False

    @property
    def min_train_size(self) -> int:
        """Rows `train` needs at least."""
        return 1

    @property
    def recommended_train_size(self) -> int:
        """Rows a good training sample has."""
        return 1

    def train(self, sample: np.ndarray) -> None:
        """Learn the index's codes from a sample of rows; nothing to learn by default (the sample is only
        checked, as every vector entering an index is)."""
        as_vectors(sample, self.dim, what="training sample")

    @abstractmethod
    def add(self, vectors: np.ndarray) -> None:
        """Append rows; row ids continue from `ntotal`."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Queries [Q, dim] -> (scores float32 [Q, k'], ids int64 [Q, k']), k' = min(k, ntotal),
        each row ordered by `sort_topk`."""

    @abstractmethod
    def save(self, path: Path) -> None: ...

    def search_candidates(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None = None
                          ) -> Candidates:
        """Approximate top-k and `bound`, an upper bound on the exact score of every row left out. By default
        from `search`: exact kinds bound by the k'-th score plus float32 rounding, others know nothing (+inf);
        either way -inf when every row came back."""
        q = as_vectors(queries, self.dim, what="queries")
        scores, ids = self.search(q, k, params)
        if not self.exact_search or ids.shape[1] == 0:
            full = ids.shape[1] >= self.ntotal
            return Candidates(scores, ids, np.full(len(q), -np.inf if full else np.inf))
        return Candidates(scores, ids, stored_rows_bound(q, scores, ids, self.ntotal))

    @classmethod
    def build_template(cls, t: int, rows: np.ndarray, out_dir: Path, *, use_gpu: bool,
                       search_params: Mapping[str, Any]) -> None:
        """Train template t's index on a seeded sample of its rows, add all rows in chunks, save it."""
        backend = cls.create(rows.shape[1], use_gpu=use_gpu, search_params=search_params or None)
        if backend.needs_training:
            backend.train(_training_sample(rows, backend))
        for start in range(0, len(rows), FILL_CHUNK):
            backend.add(np.ascontiguousarray(rows[start:start + FILL_CHUNK]))
        backend.save(Path(out_dir) / template_file(t, cls.file_suffix))

    @classmethod
    def open_searchers(cls, index: IndexData, *, use_gpu: bool) -> Iterator[TemplateSearcher]:
        """One searcher per template: its backend, and for approximate kinds the raw rows to re-rank against."""
        for t in range(index.num_templates):
            backend = index.load_template(t, use_gpu=use_gpu)
            searcher = _BackendSearcher(t, backend, None if cls.exact_search else index.vectors(t))
            del backend  # the searcher holds the only reference, so releasing it frees the index
            try:
                yield searcher
            finally:
                searcher.release()

    @classmethod
    def hold_searchers(cls, index: IndexData, *, use_gpu: bool) -> list[TemplateSearcher]:
        """Every template's searcher at once, never released (`IndexKind.hold_searchers`)."""
        return [_BackendSearcher(t, index.load_template(t, use_gpu=use_gpu),
                                 None if cls.exact_search else index.vectors(t)) for t in range(index.num_templates)]


def _training_sample(rows: np.ndarray, backend: NameIndexBackend) -> np.ndarray:
    """A seeded random sample of the rows, sorted (sequential reads from a memmap), of the recommended size."""
    size = min(len(rows), max(backend.recommended_train_size, backend.min_train_size))
    if size < backend.min_train_size:
        raise InputError(f"index {backend.kind} needs at least {backend.min_train_size} names to train, "
                         f"the names file holds {len(rows)}; choose a smaller index (e.g. --index flat)")
    sample = np.sort(np.random.default_rng(TRAIN_SEED).choice(len(rows), size=size, replace=False))
    return np.ascontiguousarray(rows[sample])


# Not frozen: `release` drops the backend when the searchers' iterator moves on to the next template.
class _BackendSearcher:
    """Template t through its own backend: exact kinds answer directly, the others through `search_exact`."""

    def __init__(self, t: int, backend: NameIndexBackend, vectors: np.ndarray | None):
        self.templates = (t,)
        self._backend: NameIndexBackend | None = backend
        self._vectors = vectors  # None for exact kinds

    def release(self) -> None:
        self._backend = self._vectors = None

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None, fallback: bool
               ) -> TemplateSearchResult:
        backend = self._backend
        if backend is None:
            raise RuntimeError(f"the searcher of template {self.templates[0]} was used after its iterator moved on")
        if backend.exact_search:
            scores, ids = backend.search(queries, k, params or None)
            ones = np.ones((len(scores), 1), bool)
            return TemplateSearchResult(self.templates, scores[:, None], ids[:, None], ones, ~ones, ~ones)
        res = search_exact(backend, self._vectors, queries, k, params or None, fallback, need=Exactness.TOP1)
        return TemplateSearchResult(self.templates, res.scores[:, None], res.ids[:, None],
                                    np.zeros((len(res.ids), 1), bool), res.certified[:, None],
                                    res.fell_back[:, None])
