"""Paired tests of two models over the same people: McNemar's exact test on decisions, the Wilcoxon
signed-rank test on scores.

Paired, because the question is whether *these* people are known less by the second model (after
unlearning, an opt-out or fine-tuning) than by the first: each person is their own control.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> dict:
    """McNemar's exact test on paired decisions (bool [P], True = member): under "no change", a person whose
    decision flipped is equally likely to flip either way, so the member -> non-member count among the
    flips is Binomial(flips, 1/2); the p-value is that binomial test's, two-sided."""
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    lost, gained = int((before & ~after).sum()), int((~before & after).sum())
    flips = lost + gained
    return {"test": "McNemar, exact (two-sided binomial test on the flipped decisions)",
            "persons": int(len(before)), "member_to_non_member": lost, "non_member_to_member": gained,
            "p_value": float(stats.binomtest(lost, flips, 0.5).pvalue) if flips else 1.0}


def wilcoxon_signed_rank(before: np.ndarray, after: np.ndarray) -> dict:
    """The Wilcoxon signed-rank test on paired scores, two-sided. Zero differences are dropped first
    (Wilcoxon's convention); the p-value is exact for up to 50 non-zero differences without tied
    magnitudes, else from the normal approximation (with scipy's tie correction), and says which."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    keep = ~(np.isnan(before) | np.isnan(after))
    diff = (after - before)[keep]
    nonzero = diff[diff != 0]
    entry = {"test": "Wilcoxon signed-rank (two-sided, zero differences dropped)", "persons": int(keep.sum()),
             "nonzero": int(len(nonzero)), "rose": int((diff > 0).sum()), "fell": int((diff < 0).sum()),
             "mean_change": float(diff.mean()) if len(diff) else None,
             "median_change": float(np.median(diff)) if len(diff) else None}
    if not len(nonzero):
        return {**entry, "statistic": None, "p_value": None, "method": None,
                "note": "every difference is zero: nothing to test"}
    exact = len(nonzero) <= 50 and len(np.unique(np.abs(nonzero))) == len(nonzero)
    method = "exact" if exact else "asymptotic"
    result = stats.wilcoxon(nonzero, alternative="two-sided", method=method)
    return {**entry, "statistic": float(result.statistic), "p_value": float(result.pvalue), "method": method}
