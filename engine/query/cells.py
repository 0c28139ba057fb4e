"""Decide per cell, not per photo: certified paper-mode outcomes from witnesses, brute force for the rest.

A cell is one (person, template). Paper mode (docs/attack.md, step 5) needs of a cell only whether the
true name y is the unique plurality of the person's predicted names, not every photo's exact top-1. After a
prefilter (any index kind's candidates, re-ranked with the engine's exact score, `indexes.exact`) the true
name is scored exactly too and merged into each photo's candidates; then each photo of the cell is one of:

- KNOWN: its exact top-1 is known (the prefilter's certificate, or brute force). It votes that name.
- WITNESSED: a candidate c ranks above y (exact score higher, or equal with a lower id: the engine's one
  order). The exact arg-max ranks at or above c, so it is not y: the photo does not vote for y, whichever
  name it votes for. c is a *witness*; the photo's exact top-1 is not needed.
- MAYBE: y tops the photo's candidates; a name outside them might still beat it.

With W known votes for y, K the most known votes of any single other name, X witnessed and U maybe photos:
- certified hit:  W > K + X + U   (even if every open photo voted for the strongest other name);
- certified miss: W + U <= K      (even if every maybe photo voted y, y at best ties another name);
- otherwise the cell is open. Round 1 brute-forces, per open cell, just enough of its maybe photos
  (widest margin first) that the cell becomes a certified hit if they all confirm y:
  a = min(U, floor((K + X + U - W) / 2) + 1). Round 2 brute-forces every photo still not known in the cells
  still open, which then are fully known. So each template's rows are scanned at most twice, for only the
  photos that cells need. With `one_pass`, round 1 takes every photo of the open cells at once (one scan;
  for resolvers where a second scan of the rows costs more than the photos round 1 would save).

What is reported. Scores and decisions are those of the exact dense computation. Per photo and template,
`status` says what its top-1 is: exact (KNOWN) or only certified not to change the cell's outcome
(WITNESSED: the best candidate found, which beats y; MAYBE, left open in a settled cell: y, which tops its
candidates).
Voting over the reported top-1s gives the certified outcome of every cell (`decide_cells` checks this), but
the vote counts (mode, mode votes, true votes) are exact only in cells whose photos are all KNOWN
(`counts_exact`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from idia_engine.indexes.vectors import sort_topk

# Per (photo, template): how its reported top-1 was obtained (predictions/top1_status.npy).
EXACT_BY_INDEX = 0  # the index kind answers exactly by itself (flat, dense)
CERTIFIED = 1  # the prefilter's top-1 is proved to be the exact arg-max
BRUTE_FORCE = 2  # answered by brute force over all rows
WITNESSED = 3  # not the exact top-1: a candidate proved to rank above the true name
TRUE_UNRESOLVED = 4  # not known to be the exact top-1: the true name tops the candidates (cell settled anyway)
UNCERTIFIED = 5  # approximate: an approximate kind's answer kept without certificate (fallback off)
STATUS_NAMES = {EXACT_BY_INDEX: "exact by the index", CERTIFIED: "certified exact", BRUTE_FORCE: "brute force",
                WITNESSED: "witnessed (not the true name; top-1 not exact)",
                TRUE_UNRESOLVED: "true name on top of the candidates (top-1 not proved)",
                UNCERTIFIED: "approximate (not certified)"}
EXACT_STATUSES = (EXACT_BY_INDEX, CERTIFIED, BRUTE_FORCE)

# Per cell: when its outcome was settled.
BY_WITNESSES, BY_ROUND_1, BY_ROUND_2 = 0, 1, 2

Resolver = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # photo rows -> exact (scores, ids) [m, k]


@dataclass(frozen=True)
class CellDecision:
    """One template's cells: the outcome of every person's cell and what each photo's reported top-k is."""

    scores: np.ndarray  # float32 [M, k]: exact scores of the reported names, ordered by sort_topk
    ids: np.ndarray  # int64 [M, k]: the reported names (top-1 = ids[:, 0])
    status: np.ndarray  # int8 [M]: CERTIFIED, BRUTE_FORCE, WITNESSED or TRUE_UNRESOLVED
    hit: np.ndarray  # bool [P]: the true name is the unique plurality (the exact outcome)
    settled_by: np.ndarray  # int8 [P]: BY_WITNESSES, BY_ROUND_1 or BY_ROUND_2
    counts_exact: np.ndarray  # bool [P]: every photo of the cell has an exact top-1, so its vote counts are exact
    brute_forced: int  # photos answered by brute force in this template

    @property
    def top1_exact(self) -> np.ndarray:
        return np.isin(self.status, EXACT_STATUSES)


def merge_true_name(scores: np.ndarray, ids: np.ndarray, true_ids: np.ndarray, true_scores: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Each photo's candidates with its true name (exact score `true_scores`) merged in at its rank, k kept."""
    k = ids.shape[1]
    present = (ids == true_ids[:, None]).any(axis=1)
    add_s = np.where(present, -np.inf, true_scores).astype(np.float32)[:, None]
    add_i = np.where(present, -1, true_ids).astype(np.int64)[:, None]
    s, i = sort_topk(np.concatenate([scores, add_s], 1), np.concatenate([ids, add_i], 1))
    return s[:, :k].copy(), i[:, :k].copy()


def _max_other_votes(person: np.ndarray, name: np.ndarray, n_persons: int) -> np.ndarray:
    """int64 [P]: per person, the most votes any single name got among the given (person, name) votes."""
    out = np.zeros(n_persons, np.int64)
    if len(person):
        key = person * (int(name.max()) + 1) + name
        uniq, counts = np.unique(key, return_counts=True)
        np.maximum.at(out, uniq // (int(name.max()) + 1), counts)
    return out


@dataclass(frozen=True)
class _Counts:
    known_true: np.ndarray  # W [P]
    known_other: np.ndarray  # K [P]
    witnessed: np.ndarray  # X [P]
    maybe: np.ndarray  # U [P]

    @property
    def hit(self) -> np.ndarray:
        return self.known_true > self.known_other + self.witnessed + self.maybe

    @property
    def miss(self) -> np.ndarray:
        return self.known_true + self.maybe <= self.known_other


def _count(ids: np.ndarray, known: np.ndarray, person: np.ndarray, y: np.ndarray, n_persons: int) -> _Counts:
    top = ids[:, 0]
    is_true = top == y
    kt, ko = known & is_true, known & ~is_true
    return _Counts(np.bincount(person[kt], minlength=n_persons),
                   _max_other_votes(person[ko], top[ko], n_persons),
                   np.bincount(person[~known & ~is_true], minlength=n_persons),
                   np.bincount(person[~known & is_true], minlength=n_persons))


def decide_cells(scores: np.ndarray, ids: np.ndarray, certified: np.ndarray, true_scores: np.ndarray,
                 person: np.ndarray, true_ids: np.ndarray, resolve: Resolver, *, one_pass: bool = False
                 ) -> CellDecision:
    """Settle every person's cell of one template, brute-forcing only what witnesses leave open.

    scores/ids: float32/int64 [M, k] each photo's candidates with exact scores, ordered by sort_topk (k >= 1).
    certified: bool [M] the candidates' top-1 is proved exact. true_scores: float32 [M] the exact score of
    each photo's true name. person: int [M] 0..P-1. true_ids: int [P]. resolve(rows) -> exact (scores, ids)
    [len(rows), k] over all names, for those photo rows (one batched brute-force pass per call).
    one_pass: resolve every photo of the open cells in round 1 (one call, no round 2): for a resolver where a
    second call, reading all rows again, costs more than the photos it saves (a bf16 scan)."""
    person = np.asarray(person, np.int64)
    true_ids = np.asarray(true_ids, np.int64)
    n_persons = len(true_ids)
    y = true_ids[person]
    scores, ids = merge_true_name(np.asarray(scores, np.float32), np.asarray(ids, np.int64), y,
                                  np.asarray(true_scores, np.float32))
    status = np.where(certified, CERTIFIED, np.where(ids[:, 0] == y, TRUE_UNRESOLVED, WITNESSED)).astype(np.int8)
    settled_by = np.full(n_persons, BY_WITNESSES, np.int8)
    brute_forced = 0
    for round_ in (BY_ROUND_1, BY_ROUND_2):
        counts = _count(ids, np.isin(status, EXACT_STATUSES), person, y, n_persons)
        open_ = ~(counts.hit | counts.miss)
        if not open_.any():
            break
        settled_by[open_] = round_
        pending = open_[person] & ~np.isin(status, EXACT_STATUSES)
        if round_ == BY_ROUND_1 and not one_pass:
            pending &= status == TRUE_UNRESOLVED
            need = np.minimum(counts.maybe, (counts.known_other + counts.witnessed + counts.maybe
                                             - counts.known_true) // 2 + 1)
            rows = _widest_margin_first(np.flatnonzero(pending), person, scores, need)
        else:
            rows = np.flatnonzero(pending)
        if len(rows):
            s, i = resolve(rows)
            scores[rows], ids[rows] = -np.inf, -1  # fewer than k names: the rest stays empty
            scores[rows, :s.shape[1]], ids[rows, :i.shape[1]] = s, i
            status[rows] = BRUTE_FORCE
            brute_forced += len(rows)
    known = np.isin(status, EXACT_STATUSES)
    final = _count(ids, known, person, y, n_persons)
    if (~(final.hit | final.miss)).any():
        raise AssertionError("cells left open after brute force over every photo of them")
    hit = final.hit
    reported = _reported_hits(ids[:, 0], person, true_ids)
    if not np.array_equal(reported, hit):
        raise AssertionError("the vote over the reported top-1s differs from the certified cell outcomes")
    counts_exact = np.bincount(person[~known], minlength=n_persons) == 0
    return CellDecision(scores, ids, status, hit, settled_by, counts_exact, brute_forced)


def _widest_margin_first(rows: np.ndarray, person: np.ndarray, scores: np.ndarray, need: np.ndarray) -> np.ndarray:
    """Of the maybe photos `rows`, the need[p] of each person p whose true name leads its runner-up by most."""
    if not len(rows):
        return rows
    runner_up = scores[rows, 1] if scores.shape[1] > 1 else np.full(len(rows), -np.inf, np.float32)
    margin = scores[rows, 0].astype(np.float64) - runner_up.astype(np.float64)
    p = person[rows]
    order = np.lexsort((rows, -margin, p))
    rows, p = rows[order], p[order]
    rank = np.arange(len(rows)) - np.searchsorted(p, p)
    return np.sort(rows[rank < need[p]])


def _reported_hits(top1: np.ndarray, person: np.ndarray, true_ids: np.ndarray) -> np.ndarray:
    """bool [P]: paper mode over the reported top-1s of one template (the same rule as `votes.py`)."""
    from .votes import paper_mode_votes

    return paper_mode_votes(top1[:, None], person, true_ids).hits[:, 0]
