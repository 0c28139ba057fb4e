"""The template ensemble with a bfloat16 copy of every template: witnesses first, certified bf16 scans after.

`--index ensemble-bf16` stores what `ensemble` stores (the names' mean embeddings; the raw float32 rows on
disk) plus each template's rows rounded to bfloat16 (`indexes.bf16`), the float32 rows held as those bf16 rows
plus the 16 bits each rounding dropped (`indexes.split_rows`: 4 bytes per element in all). A query then
runs in three steps, each exact or certified:

1. Prefilter: the ensemble's candidates (stage 1 over the means, stage 2 re-scored exactly per template), with
   stage 1 as a bf16 scan of the means whose bound on every name left out is proved (`BF16ScanBackend`), so
   the ensemble's certificate keeps its meaning. Only DEFAULT_CANDIDATES names per photo are re-scored: cells
   need witnesses (a name above the true one), not the whole top-k.
2. Cells: per (person, template), witnesses settle most cells of people the model does not know without any
   scan (`engine/query/cells.py`).
3. Resolver: the photos that open cells need get their exact top-k from a bf16 scan of the template, its
   candidates re-scored exactly against the float32 rows and certified by the bf16 bound (a second look at the
   scan's blocks, then float32 brute force, for the few it cannot certify). With cells off (`--no-cells`)
   the same resolver answers every (photo, template) the prefilter cannot certify.

Scores and decisions are those of the exact dense computation either way. Where the bf16 scans pay depends
on the CPU: with AVX-512 BF16 or AMX they run several times faster than float32; without them torch
emulates bf16 and is slower, so there (and on a GPU, where the bf16 bound for its arithmetic is not derived)
both scans use the float32 paths instead, with the same answers (`indexes.hardware`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import FILL_CHUNK, IndexData, Resolver, TemplateSearcher, TemplateSearchResult
from .bf16 import BF16ScanBackend, SplitRowsStorage
from .ensemble import ENSEMBLE_DIR, EnsembleIndex, EnsembleSearcher, TemplateEnsemble
from .errors import IndexFileError
from .exact import Exactness, brute_force_device, search_exact
from .hardware import cpu_bf16_native
from .registry import register_backend

log = logging.getLogger(__name__)

# K' of the prefilter: a witness only has to beat the true name, and people the model does not know have many
# names above theirs (on the bench generator 8 candidates settle as many cells as 32, at a quarter of the
# re-scoring).
DEFAULT_CANDIDATES = 8
MEANS_BF16 = "means.bf16.npz"  # in the ensemble folder: stage 1's bf16 copy of the means (`BF16ScanBackend`)


def bf16_scans_pay(use_gpu: bool) -> bool:
    """Whether this process scans in bf16: on the CPU, and only where the CPU multiplies bf16 natively."""
    return brute_force_device(use_gpu).type == "cpu" and cpu_bf16_native()


@register_backend
class EnsembleBF16Index(SplitRowsStorage, EnsembleIndex):
    """The ensemble's means, one `BF16ScanBackend` file per template, and the float32 rows as their low halves
    (module docstring)."""

    kind: ClassVar[str] = "ensemble-bf16"
    file_suffix: ClassVar[str] = BF16ScanBackend.file_suffix  # template t's bf16 copy, read by load_template

    @classmethod
    def build_disk_bytes(cls, num_names: int, num_templates: int, dim: int) -> int:
        """The bf16 kinds' rows (`SplitRowsStorage.build_disk_bytes`), the ensemble, its means in bf16."""
        return (super().build_disk_bytes(num_names, num_templates, dim)
                + TemplateEnsemble.disk_bytes(num_names, num_templates, dim) + num_names * dim * 2 + 4096)

    @classmethod
    def build_template(cls, t: int, rows: np.ndarray, out_dir: Path, *, use_gpu: bool,
                       search_params: Mapping[str, Any]) -> None:
        """Template t's rows rounded to bf16, with the norms the bound needs (the ensemble is built at the end)."""
        BF16ScanBackend.build_template(t, rows, out_dir, use_gpu=False, search_params={})

    @classmethod
    def load(cls, path: Path, *, use_gpu: bool = False) -> BF16ScanBackend:
        return BF16ScanBackend.load(path)

    @classmethod
    def finish_build(cls, out_dir: Path, rows: Sequence[np.ndarray], *,
                     progress: Callable[[str, int, int], None]) -> None:
        """The ensemble, then stage 1's bf16 copy of its means (MEANS_BF16), so a query loads it rather than
        rounding 10^6 x 512 means on every run."""
        super().finish_build(out_dir, rows, progress=progress)
        folder = Path(out_dir) / ENSEMBLE_DIR
        _round_means(TemplateEnsemble.load(folder, mmap=True).means).save(folder / MEANS_BF16)

    @classmethod
    def open_searchers(cls, index: IndexData, *, use_gpu: bool) -> Iterator[TemplateSearcher]:
        ensemble = TemplateEnsemble.load(index.data_dir / ENSEMBLE_DIR)
        stage1 = None
        if bf16_scans_pay(use_gpu):
            stage1 = _stage1(index.data_dir / ENSEMBLE_DIR, ensemble)
        yield _Searcher(ensemble, tuple(index.vectors(t) for t in range(index.num_templates)), stage1, index, use_gpu)

    @classmethod
    def resolve_in_one_pass(cls, *, use_gpu: bool) -> bool:
        # one bf16 scan of all open photos ran faster than two rounds (10^5 names x 21, member fraction 0.5,
        # 2-core Xeon with AMX: 0.80 s against 0.90 s): a second scan re-reads every row for the few photos left
        return bf16_scans_pay(use_gpu)

    @classmethod
    def resolver_label(cls, *, use_gpu: bool) -> str:
        if bf16_scans_pay(use_gpu):
            return "certified bf16 scan"
        return super().resolver_label(use_gpu=use_gpu)

    @classmethod
    def open_resolver(cls, index: IndexData, t: int, *, use_gpu: bool) -> Resolver:
        """The certified bf16 scan of template t where it pays (see `bf16_scans_pay`), else float32 brute force.
        The bf16 rows are loaded on the first call, so a resolver that is never called costs nothing."""
        if not bf16_scans_pay(use_gpu):
            return super().open_resolver(index, t, use_gpu=use_gpu)
        loaded: list[BF16ScanBackend] = []

        def resolve(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            if not loaded:
                loaded.append(index.load_template(t))
            res = search_exact(loaded[0], index.vectors(t), queries, k, fallback=True, need=Exactness.TOPK)
            return res.scores, res.ids

        return resolve


def _stage1(folder: Path, ensemble: TemplateEnsemble) -> BF16ScanBackend:
    """Stage 1's bf16 scan of the means: the copy the build saved, or (indexes built before it) made now."""
    if (folder / MEANS_BF16).is_file():
        stage1 = BF16ScanBackend.load(folder / MEANS_BF16)
        if (stage1.ntotal, stage1.dim) != ensemble.means.shape:
            raise IndexFileError(f"{folder / MEANS_BF16} holds {stage1.ntotal} x {stage1.dim} means, the ensemble "
                                 f"{ensemble.means.shape[0]} x {ensemble.means.shape[1]}; rebuild the index")
        return stage1
    return _round_means(ensemble.means)


def _round_means(means: np.ndarray) -> BF16ScanBackend:
    """Stage 1's bf16 scan over the means float32 [N, D] (an array or memmap, added in chunks of rows)."""
    stage1 = BF16ScanBackend.create(means.shape[1])
    for start in range(0, len(means), FILL_CHUNK):
        stage1.add(np.ascontiguousarray(means[start:start + FILL_CHUNK]))
    return stage1


@dataclass(frozen=True)
class _Searcher(EnsembleSearcher):
    """All templates through the ensemble (stage 1 in bf16 where it pays); what it cannot certify, with
    fallback on, through each template's resolver, one template's bf16 rows in memory at a time.
    params: {"candidates": K'} (default DEFAULT_CANDIDATES of this module)."""

    default_candidates: ClassVar[int] = DEFAULT_CANDIDATES
    stage1: BF16ScanBackend | None  # the means in bf16 (None: exact flat search over them)
    index: IndexData
    use_gpu: bool

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] | None, fallback: bool
               ) -> TemplateSearchResult:
        res = self.ensemble.search(queries, self.sources, k, candidates=self.candidates(params), fallback=False,
                                   backend=self.stage1)
        scores, ids, fell_back = res.scores.copy(), res.ids.copy(), np.zeros_like(res.certified)
        for t in self.templates if fallback else ():
            redo = np.flatnonzero(~res.certified[:, t])
            if len(redo):
                resolve = EnsembleBF16Index.open_resolver(self.index, t, use_gpu=self.use_gpu)
                s, i = resolve(np.asarray(queries)[redo], ids.shape[2])
                scores[redo, t], ids[redo, t] = -np.inf, -1
                scores[redo, t, :s.shape[1]], ids[redo, t, :i.shape[1]] = s, i
                fell_back[redo, t] = True
                del resolve
        return TemplateSearchResult(self.templates, scores, ids, np.zeros_like(res.certified), res.certified,
                                    fell_back)
