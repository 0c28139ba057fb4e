"""Stage 4b of query: the cells an approximate index kind's candidates leave open, settled exactly.

For index kinds that are not exact by themselves (ensemble, IVF, ...) the search stage keeps each image's
re-ranked candidates and their certificates without brute force; here, per template, each person's cell is
settled from them by witnesses (`cells.py`), and only the photos that open cells need are answered exactly
over all of the template's names, in at most two batched passes, by the kind's resolver (a float32 GEMM over
the raw rows by default; a certified bf16 scan for `ensemble-bf16` on a CPU that multiplies bf16 natively).
Scores and decisions equal the exact dense computation; `predictions/top1_status.npy` says which top-1s are
exact.
"""

from __future__ import annotations

import numpy as np
from idia_engine.indexes.exact import exact_dot, exact_scores

from ..disk.faults import fault_point
from ..progress import Progress
from .cells import BY_ROUND_1, BY_ROUND_2, BY_WITNESSES, CERTIFIED, decide_cells
from .search import SearchJob, merge_extra


def settle_cells(job: SearchJob, person: np.ndarray, true_ids: np.ndarray, ids_out: np.ndarray,
                 scores_out: np.ndarray, status_out: np.ndarray, progress: Progress) -> dict:
    """Settle every (person, template) cell, rewriting ids_out/scores_out [M, T, k] and status_out [M, T] of
    the photos brute-forced or witnessed; return the `cells` section of summary.json's `search`."""
    index = job.index
    n_templates, n_index, k = index.num_templates, len(index.names), ids_out.shape[2]
    stats = {"cells": len(true_ids) * n_templates, "settled_by_witnesses": 0, "settled_in_round_1": 0,
             "settled_in_round_2": 0, "photos_brute_forced": 0,
             "resolver": index.kind.resolver_label(use_gpu=job.use_gpu)}
    if not len(job.images):
        return stats
    q = np.concatenate([emb for _, emb in job.images.chunks(job.chunk)])
    y = np.asarray(true_ids, np.int64)[person]
    in_index = y < n_index
    one_pass = index.kind.resolve_in_one_pass(use_gpu=job.use_gpu)
    progress("settle cells", 0, n_templates)
    for t in range(n_templates):
        rows = index.vectors(t)
        true_scores = np.empty(len(q), np.float32)
        true_scores[in_index] = exact_scores(rows, q[in_index], y[in_index, None])[:, 0]
        if not in_index.all():  # a true name added for this run: scored exactly beside the index
            true_scores[~in_index] = exact_dot(job.extra_emb[t][y[~in_index] - n_index], q[~in_index])

        exact = index.kind.open_resolver(index, t, use_gpu=job.use_gpu)  # the kind's fastest exact top-k

        def resolve(r: np.ndarray, t: int = t, exact=exact) -> tuple[np.ndarray, np.ndarray]:
            s, i = exact(q[r], k)
            return merge_extra(n_index, t, q[r], s, i, job.extra_emb, k)

        dec = decide_cells(np.asarray(scores_out[:, t]), np.asarray(ids_out[:, t], np.int64),
                           np.asarray(status_out[:, t]) == CERTIFIED, true_scores, person, true_ids, resolve,
                           one_pass=one_pass)
        ids_out[:, t], scores_out[:, t], status_out[:, t] = dec.ids, dec.scores, dec.status
        for key, when in (("settled_by_witnesses", BY_WITNESSES), ("settled_in_round_1", BY_ROUND_1),
                          ("settled_in_round_2", BY_ROUND_2)):
            stats[key] += int((dec.settled_by == when).sum())
        stats["photos_brute_forced"] += dec.brute_forced
        del rows, exact
        progress("settle cells", t + 1, n_templates)
        fault_point("query.settle.template")
    return stats
