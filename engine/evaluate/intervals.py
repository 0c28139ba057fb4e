"""Uncertainty over people: exact binomial intervals for rates, a seeded bootstrap for AUC and TPR at a
fixed FPR, and the plain sentences that say what a population can and cannot show.

Why over people: the draws of the protocol vary which photos a person shows, not who is in the study.
With 100 non-members, 0 false positives still allow an FPR of 3.6 % at 95 % confidence; that is the
uncertainty an auditor signs, and mean +- std over draws does not show it.

- Rates (TPR, FPR, TNR, FNR, accuracy) get the Clopper-Pearson interval: the two-sided exact binomial
  interval, which never falls below its nominal coverage. It is written with beta quantiles, so a count
  that is a mean over draws (not a whole number) gets the interval at that count, continuously.
- AUC and TPR at FPR <= x get a percentile bootstrap over persons, stratified by membership (members and
  non-members are resampled separately, so both classes keep their sizes and every resample has an AUC),
  seeded, through `scipy.stats.bootstrap`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95  # of every interval the evaluation and the comparison report
BOOTSTRAP_RESAMPLES = 2000  # resamples of persons per bootstrapped number


@dataclass(frozen=True)
class Interval:
    """A two-sided interval for one number, at `confidence`."""

    low: float
    high: float
    confidence: float
    method: str  # "Clopper-Pearson" or "bootstrap (percentile, stratified by membership, seed s, N resamples)"

    def as_json(self) -> dict:
        return {"low": float(self.low), "high": float(self.high)}


def clopper_pearson(k: float, n: int, confidence: float = CONFIDENCE) -> Interval | None:
    """The exact binomial interval for a rate k / n; None when n = 0 (no rate to bound).

    low = Beta(a/2; k, n - k + 1) quantile, high = Beta(1 - a/2; k + 1, n - k) quantile, with low = 0 at
    k = 0 and high = 1 at k = n (a = 1 - confidence). For whole k it equals scipy's binomtest
    proportion_ci(method="exact").
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"count {k} out of 0..{n}")
    alpha = 1 - confidence
    low = 0.0 if k <= 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k >= n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return Interval(low, high, confidence, "Clopper-Pearson")


def rate_entry(k: float, n: int, confidence: float = CONFIDENCE) -> dict:
    """{"value", "k", "n", "low", "high"} of a rate k / n (value, low, high None when n = 0)."""
    interval = clopper_pearson(k, n, confidence)
    return {"value": None if interval is None else float(k) / n, "k": k, "n": n,
            "low": None if interval is None else interval.low, "high": None if interval is None else interval.high}


def stratified_bootstrap(statistic: Callable[..., np.ndarray], member_scores: np.ndarray,
                         non_member_scores: np.ndarray, seed: int, resamples: int = BOOTSTRAP_RESAMPLES,
                         confidence: float = CONFIDENCE) -> Interval | None:
    """Percentile bootstrap interval of statistic(member scores, non-member scores, axis), persons resampled
    with replacement within each class. The statistic takes batches of resamples (arrays [..., n], reduced
    over `axis`). None when a class has fewer than 2 persons or the statistic is undefined."""
    pos = np.asarray(member_scores, float)
    neg = np.asarray(non_member_scores, float)
    if len(pos) < 2 or len(neg) < 2:  # one person of a class has no spread to resample: no interval
        return None
    if np.isnan(statistic(pos, neg)):
        return None
    with warnings.catch_warnings():
        # every resample equal (e.g. all scores 0) is a degenerate but valid answer: the interval is a point
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        # batches of resamples bound the memory: [batch, persons] floats per class
        batch = max(1, min(resamples, 2_000_000 // max(1, len(pos) + len(neg))))
        result = stats.bootstrap((pos, neg), statistic, n_resamples=resamples, confidence_level=confidence,
                                 method="percentile", vectorized=True, paired=False, batch=batch,
                                 rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if np.isnan(low) or np.isnan(high):  # all resamples identical: scipy reports NaN, the interval is a point
        value = float(statistic(pos, neg))
        low = high = value
    return Interval(low, high, confidence,
                    f"bootstrap (percentile, stratified by membership, seed {seed}, {resamples} resamples)")


# ----------------------------------------------------------------------------------------------------
# What a population can show, in words
# ----------------------------------------------------------------------------------------------------

def _percent(x: float) -> str:
    return f"{100 * x:.2g} %" if x < 0.1 else f"{100 * x:.3g} %"


def rate_sentence(what: str, k: int, n: int, people: str, confidence: float = CONFIDENCE) -> str:
    """'0 of 100 non-members: FPR <= 3.6 % at 95 %' (an upper bound at k = 0, a lower one at k = n, else the
    interval)."""
    interval = clopper_pearson(k, n, confidence)
    level = f"{100 * confidence:g} %"
    if interval is None:
        return f"no {people}: {what} is undefined"
    if k == 0:
        return f"0 of {n} {people}: {what} <= {_percent(interval.high)} at {level}"
    if k == n:
        return f"{n} of {n} {people}: {what} >= {_percent(interval.low)} at {level}"
    return (f"{k} of {n} {people}: {what} = {_percent(k / n)}, between {_percent(interval.low)} and "
            f"{_percent(interval.high)} at {level}")


def smallest_provable_fpr(non_members: int, confidence: float = CONFIDENCE) -> float | None:
    """The lowest FPR upper bound this many non-members can give: Clopper-Pearson's high end at 0 false
    positives. A claim of TPR at an FPR below it cannot be backed by the population. None without any."""
    interval = clopper_pearson(0, non_members, confidence)
    return None if interval is None else interval.high


def low_fpr_sentences(non_members: int, targets: tuple[float, ...], confidence: float = CONFIDENCE) -> list[str]:
    """For each FPR target the population cannot support, one sentence saying so in numbers."""
    bound = smallest_provable_fpr(non_members, confidence)
    if bound is None:
        return []
    needed = {t: _non_members_needed(t, confidence) for t in targets if 0 < t < bound}
    return [f"TPR at FPR <= {_percent(t)} cannot be backed by {non_members} non-members: even 0 false positives "
            f"only show FPR <= {_percent(bound)} at {100 * confidence:g} %; showing FPR <= {_percent(t)} takes at "
            f"least {n} non-members with 0 false positives" for t, n in needed.items()]


def _non_members_needed(target: float, confidence: float) -> int:
    """The fewest non-members whose 0 false positives bound FPR <= target (Clopper-Pearson): the smallest
    n with 1 - (a/2)^(1/n) <= target, a = 1 - confidence."""
    alpha = 1 - confidence
    n = int(np.ceil(np.log(alpha / 2) / np.log1p(-target)))
    while clopper_pearson(0, n, confidence).high > target:  # guard the float rounding of the closed form
        n += 1
    return n
