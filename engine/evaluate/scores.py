"""Continuous membership scores beside paper mode. None of them is the paper's score.

Paper mode gives an integer 0..T, so its ROC has at most T + 2 points and a low-FPR operating point often
does not exist. These scores use the same cached predictions (top-k per photo and template) and rank
people more finely; each is a function of one person's photos plus, for the calibrated score, the other
people's photos, never of the labels:

- vote_share: the fraction of the person's (photo, template) pairs whose top-1 is the true name.
- margin: the mean over those pairs of (true name's cosine - best other name's cosine). Positive where the
  true name is top-1 (its lead over rank 2), negative where it is not. Censored: where the true name is
  not in the top-k, only an upper bound is known (the k-th cosine - the top-1 cosine), and that bound is
  used; with k = 1 the lead of a top-1 true name is unknown and counted as 0. `censored` is the fraction
  of a person's pairs affected; raising `query --top-k` lowers it, at k x the size of the predictions.
- reference_share: how often the true name is top-1 for the photos of *other* people of the evaluation
  (a name that attracts every face wins often without being known).
- calibrated: vote_share - reference_share, the share the name wins beyond what it wins for anyone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORE_NAMES = ("paper", "vote_share", "margin", "calibrated")  # columns of the side-by-side tables
SCORE_DEFINITIONS = {
    "paper": "the paper's score: templates whose unique plurality top-1 is the true name (0..T)",
    "vote_share": "not the paper's: fraction of (photo, template) pairs whose top-1 is the true name",
    "margin": "not the paper's: mean over (photo, template) pairs of the true name's cosine minus the best other "
              "name's; where the true name is not in the top-k the upper bound (k-th minus top-1 cosine) is used",
    "calibrated": "not the paper's: vote_share minus the share of the other evaluated people's pairs whose top-1 "
                  "is this name (controls for names that attract every face; uses no labels)",
}


@dataclass(frozen=True)
class ContinuousScores:
    """Per person (L people of the evaluation), from the selected photos."""

    vote_share: np.ndarray  # float64 [L]
    margin: np.ndarray  # float64 [L]; an upper bound where `censored` > 0
    censored: np.ndarray  # float64 [L]: fraction of the person's pairs whose margin is only an upper bound
    reference_share: np.ndarray  # float64 [L]
    calibrated: np.ndarray  # float64 [L]

    def by_name(self, paper: np.ndarray) -> dict[str, np.ndarray]:
        """score name -> [L] values, in SCORE_NAMES order, paper mode's integer score first."""
        return {"paper": np.asarray(paper, float), "vote_share": self.vote_share, "margin": self.margin,
                "calibrated": self.calibrated}


def continuous_scores(topk_ids: np.ndarray, topk_scores: np.ndarray, person_of_image: np.ndarray,
                      true_ids: np.ndarray) -> ContinuousScores:
    """topk_ids / topk_scores: [M, T, k] of the selected photos; person_of_image: int [M] in 0..L-1;
    true_ids: int [L] (negative: the true name is no candidate, so it never wins and its margin is censored).
    A person without photos gets NaN scores."""
    ids = np.asarray(topk_ids)
    cos = np.asarray(topk_scores, np.float64)
    person = np.asarray(person_of_image, np.int64)
    true_ids = np.asarray(true_ids, np.int64)
    n_people = len(true_ids)
    m, t, k = ids.shape
    true_of_image = true_ids[person]

    is_true = ids == true_of_image[:, None, None]  # [M, T, k]
    found = is_true.any(axis=2)
    rank = np.argmax(is_true, axis=2)
    top1_true = found & (rank == 0)
    true_cos = np.take_along_axis(cos, rank[:, :, None], axis=2)[:, :, 0]
    second = cos[:, :, 1] if k >= 2 else cos[:, :, 0]
    lead = np.where(k >= 2, cos[:, :, 0] - second, 0.0)  # the true name's lead where it is top-1
    margin = np.where(top1_true, lead, np.where(found, true_cos - cos[:, :, 0], cos[:, :, -1] - cos[:, :, 0]))
    censored = ~found | (top1_true & (k < 2))

    pairs = np.bincount(person, minlength=n_people).astype(np.float64) * t

    def per_person(values: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.bincount(person, weights=values.sum(axis=1), minlength=n_people) / pairs

    vote_share = per_person(top1_true.astype(np.float64))
    # How often each person's true name is top-1 over everyone's pairs, less the person's own pairs.
    top1 = ids[:, :, 0].ravel()
    valid = true_ids >= 0
    wins_all = np.zeros(n_people, np.float64)
    if valid.any():
        order = np.argsort(true_ids[valid])
        sorted_true = true_ids[valid][order]
        pos = np.searchsorted(sorted_true, top1)
        pos = np.minimum(pos, len(sorted_true) - 1)
        hit = sorted_true[pos] == top1
        counts = np.bincount(pos[hit], minlength=len(sorted_true)).astype(np.float64)
        wins_all[np.flatnonzero(valid)[order]] = counts
    own_wins = vote_share * pairs
    other_pairs = m * t - pairs
    with np.errstate(invalid="ignore", divide="ignore"):
        reference = np.where(other_pairs > 0, (wins_all - np.nan_to_num(own_wins)) / other_pairs, 0.0)
    reference = np.where(pairs > 0, reference, np.nan)
    return ContinuousScores(vote_share, per_person(margin), per_person(censored.astype(np.float64)), reference,
                            vote_share - reference)


# ----------------------------------------------------------------------------------------------------
# ROC of any score (higher = member)
# ----------------------------------------------------------------------------------------------------

def roc_curve(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, threshold) of "member iff score >= threshold" at every distinct score, highest first,
    from (0, 0) (threshold +inf) to (1, 1); NaN rates when a class is empty."""
    scores = np.asarray(scores, np.float64)
    members = np.asarray(members, bool)
    n_pos, n_neg = int(members.sum()), int((~members).sum())
    values, value_id = np.unique(scores, return_inverse=True)
    pos = np.bincount(value_id[members], minlength=len(values))[::-1]
    neg = np.bincount(value_id[~members], minlength=len(values))[::-1]
    tp = np.r_[0, np.cumsum(pos)]
    fp = np.r_[0, np.cumsum(neg)]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / n_pos if n_pos else np.full(len(tp), np.nan)
        fpr = fp / n_neg if n_neg else np.full(len(fp), np.nan)
    return fpr, tpr, np.r_[np.inf, values[::-1]]


def tpr_at_fpr(scores: np.ndarray, members: np.ndarray, target: float) -> float:
    """The best TPR of a threshold whose FPR <= target; NaN when a class is empty."""
    fpr, tpr, _ = roc_curve(scores, members)
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() and not np.isnan(tpr).any() else float("nan")
