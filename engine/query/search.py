"""Stage 4 of query: every image against every template's name index, top-k per template.

The index kind decides how (`indexes.IndexKind.open_searchers`): exact kinds (flat, dense) answer by
themselves; approximate kinds re-rank their candidates exactly against the template's raw vectors,
certify that no other name can beat the winner, and answer what they cannot certify by brute force (or,
with fallback off, keep and count it). Image embeddings stream in bounded chunks, from the store or from
embeddings computed elsewhere (`QueryEmbeddings`). Names of queried people missing from the index are
scored exactly beside it and merged into each top-k.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from idia_engine.indexes import sort_topk
from idia_engine.indexes.exact import exact_dot

from ..disk.faults import fault_point
from ..index.reader import NameIndex
from ..progress import Progress
from .cells import BRUTE_FORCE, CERTIFIED, EXACT_BY_INDEX, TRUE_UNRESOLVED, UNCERTIFIED, WITNESSED
from .store import EmbeddingStore, Namespace


class QueryEmbeddings(Protocol):
    """The image embeddings a search reads: row m is image m of the report."""

    def __len__(self) -> int: ...

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, float32 [<= size, D] L2-normalised rows) over every row in order, a bounded chunk at a time."""


@dataclass(frozen=True)
class StoredEmbeddings:
    """The embeddings `query` computed, read back from its store by image hash."""

    store: EmbeddingStore
    ns: Namespace  # the model's namespace in the store
    shas: list[str]  # images in report order

    def __len__(self) -> int:
        return len(self.shas)

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        return self.store.iter_embeddings(self.ns, self.shas, size)


@dataclass(frozen=True)
class SearchJob:
    """One search of a query run: what is searched, how, and where the answers go."""

    index: NameIndex
    images: QueryEmbeddings  # the image embeddings, in report order (row m of the outputs)
    extra_emb: np.ndarray | None  # float32 [T, E, D]: names added for this run (ids after the index's names)
    k: int  # candidates kept per image and template
    use_gpu: bool
    chunk: int  # image embeddings read and searched at once
    search_params: dict | None  # per-call parameters over the manifest's defaults
    fallback: bool  # approximate kinds: brute-force what cannot be certified


def search_all(job: SearchJob, ids_out: np.ndarray, scores_out: np.ndarray, status_out: np.ndarray,
               progress: Progress) -> dict:
    """Fill ids_out/scores_out [M, T, k] with each image's top-k candidates per template and status_out
    [M, T] with how each top-1 was obtained (`cells` status codes); return the `search` section of
    summary.json (how many predictions were exact by the index, certified, answered by brute force, or
    kept uncertified)."""
    index = job.index
    params = {**index.manifest.search_params, **(job.search_params or {})}
    total = len(job.images) * index.num_templates
    stats = {"index_kind": index.manifest.index_kind, "search_params": params, "predictions": total}
    progress("search", 0, total)
    done = 0
    status_out[:] = UNCERTIFIED
    # One searcher at a time (one template, or every template for the ensemble): memory stays bounded.
    for searcher in index.kind.open_searchers(index, use_gpu=job.use_gpu):
        for start, queries in job.images.chunks(job.chunk):
            res = searcher.search(queries, job.k, params or None, job.fallback)
            status = np.select([res.exact_by_index, res.certified, res.fell_back],
                               [EXACT_BY_INDEX, CERTIFIED, BRUTE_FORCE], UNCERTIFIED).astype(np.int8)
            for j, t in enumerate(res.templates):
                status_out[start:start + len(queries), t] = status[:, j]
                scores, ids = merge_extra(len(index.names), t, queries, res.scores[:, j], res.ids[:, j],
                                           job.extra_emb, job.k)
                ids_out[start:start + len(queries), t] = ids
                scores_out[start:start + len(queries), t] = scores
            done += len(queries) * len(res.templates)
            progress("search", done, total)
            fault_point("query.search.chunk")
        del searcher
    stats.update(status_counts(status_out))
    return stats


def status_counts(status: np.ndarray) -> dict:
    """The counts of summary.json's `search` section from the top-1 status of every (image, template)."""
    status = np.asarray(status)
    counts = {key: int((status == code).sum()) for key, code in (
        ("exact_by_index", EXACT_BY_INDEX), ("certified", CERTIFIED), ("fell_back", BRUTE_FORCE),
        ("witnessed", WITNESSED), ("true_name_unresolved", TRUE_UNRESOLVED), ("uncertified_kept", UNCERTIFIED))}
    counts["top1_exact"] = counts["exact_by_index"] + counts["certified"] + counts["fell_back"]
    counts["exact_decisions"] = counts["uncertified_kept"] == 0
    return counts


def merge_extra(n_index: int, t: int, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                extra_emb: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Names added for this run are scored exactly (the engine's exact score, `indexes.exact`) and merged
    into the top-k."""
    if extra_emb is None:
        return scores, ids
    extra_scores = exact_dot(extra_emb[t][None, :, :], np.asarray(queries, np.float32)[:, None, :])
    extra_ids = np.broadcast_to(np.arange(n_index, n_index + extra_emb.shape[1]), extra_scores.shape)
    scores, ids = sort_topk(np.concatenate([scores, extra_scores], 1), np.concatenate([ids, extra_ids], 1))
    return scores[:, :k], ids[:, :k]
