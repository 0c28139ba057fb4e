"""The numbers of one set of paper-mode scores: rates per tau, ROC, AUC, TPR at low FPR, occurrence bins,
and their aggregation over draws into JSON-ready {"mean", "std"} values.

Conventions: std is the population std over draws (ddof = 0, numpy's default). A rate whose denominator
is 0 is None (JSON null), never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..query.metrics import rate_or_nan
from .intervals import clopper_pearson

if TYPE_CHECKING:
    from .protocol import EvalConfig

COUNT_KEYS = ("TP", "FN", "FP", "TN")
RATE_KEYS = ("TPR", "FNR", "FPR", "TNR", "accuracy")


# ----------------------------------------------------------------------------------------------------
# Metrics of one set of scores
# ----------------------------------------------------------------------------------------------------

def threshold_counts(scores: np.ndarray, members: np.ndarray, n_templates: int) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp), int64 [T+2] each: members / non-members with score >= threshold, for threshold 0..T+1.

    Threshold 0 calls everyone a member, T+1 no one, so the ROC curve runs from (0, 0) to (1, 1).
    """
    scores = np.asarray(scores, np.int64)
    members = np.asarray(members, bool)
    tp = np.cumsum(np.bincount(scores[members], minlength=n_templates + 2)[::-1])[::-1]
    fp = np.cumsum(np.bincount(scores[~members], minlength=n_templates + 2)[::-1])[::-1]
    return tp[: n_templates + 2], fp[: n_templates + 2]


def roc_auc(scores: np.ndarray, members: np.ndarray) -> float:
    """Area under the ROC curve of a score (higher = member); NaN when either class is empty.

    Mann-Whitney form: P(a member's score > a non-member's) + 1/2 P(equal). This equals the trapezoid
    area under the ROC points at the distinct score thresholds, so tied scores count half.
    """
    scores = np.asarray(scores)
    members = np.asarray(members, bool)
    n_pos, n_neg = int(members.sum()), int((~members).sum())
    if not n_pos or not n_neg:
        return float("nan")
    _, value_id = np.unique(scores, return_inverse=True)
    pos = np.bincount(value_id[members], minlength=value_id.max() + 1)
    neg = np.bincount(value_id[~members], minlength=value_id.max() + 1)
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum()) / (n_pos * n_neg)


def best_tpr_at_fpr(tpr: np.ndarray, fpr: np.ndarray, target: float) -> float:
    """The highest TPR among the thresholds whose FPR <= target; NaN if the rates are undefined."""
    ok = fpr <= target  # NaN compares False
    return float(tpr[ok].max()) if ok.any() and not np.isnan(tpr).any() else float("nan")


@dataclass(frozen=True)
class ScoreStats:
    """Metrics of one set of scores (one draw, or the full report) over the people it covers."""

    counts: dict[str, int]  # TP, FN, FP, TN at tau
    rates: dict[str, float]  # TPR, FNR, FPR, TNR, accuracy at tau; NaN when undefined
    tpr: np.ndarray  # float [T+2]: TPR of "member iff score >= threshold" for threshold 0..T+1
    fpr: np.ndarray  # float [T+2]: the same for FPR
    accuracy: np.ndarray  # float [T+2]: the same for accuracy
    auc: float
    tpr_at_fpr: tuple[float, ...]  # best TPR at FPR <= each low-FPR target
    occurrence_tpr: np.ndarray  # float [bins]: members' TPR at tau per occurrence bin (NaN: nobody in the bin)


def score_stats(scores: np.ndarray, members: np.ndarray, bin_of: np.ndarray, n_bins: int, n_templates: int,
                config: EvalConfig) -> ScoreStats:
    """scores: int [L'] 0..T; members: bool [L']; bin_of: int [L'] occurrence bin, -1 for none."""
    n_pos, n_neg = int(members.sum()), int((~members).sum())
    tp, fp = threshold_counts(scores, members, n_templates)
    tpr = np.array([rate_or_nan(x, n_pos) for x in tp])
    fpr = np.array([rate_or_nan(x, n_neg) for x in fp])
    accuracy = np.array([rate_or_nan(t + n_neg - f, n_pos + n_neg) for t, f in zip(tp, fp)])
    t = config.tau
    counts = {"TP": int(tp[t]), "FN": n_pos - int(tp[t]), "FP": int(fp[t]), "TN": n_neg - int(fp[t])}
    rates = {"TPR": tpr[t], "FNR": rate_or_nan(counts["FN"], n_pos), "FPR": fpr[t], "TNR": rate_or_nan(counts["TN"], n_neg),
             "accuracy": accuracy[t]}
    binned = (bin_of >= 0) & members
    hits = np.bincount(bin_of[binned], weights=(scores[binned] >= t).astype(float), minlength=n_bins)
    totals = np.bincount(bin_of[binned], minlength=n_bins)
    occurrence_tpr = np.array([rate_or_nan(h, c) for h, c in zip(hits, totals)])
    return ScoreStats(counts, {k: float(v) for k, v in rates.items()}, tpr, fpr, accuracy,
                      roc_auc(scores, members), tuple(best_tpr_at_fpr(tpr, fpr, x) for x in config.low_fpr_targets),
                      occurrence_tpr)


# ----------------------------------------------------------------------------------------------------
# Occurrence bins
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OccurrenceBins:
    """Bins of members' training-data occurrence counts: bin b holds lows[b] <= count < lows[b + 1]."""

    kind: str  # "distinct values" (one bin per count) or "quantiles"
    lows: np.ndarray  # int64 [B]: smallest count of each bin (a value present in the data)
    highs: np.ndarray  # int64 [B]: largest count present in each bin

    @property
    def labels(self) -> list[str]:
        return [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in zip(self.lows, self.highs)]

    def assign(self, counts: np.ndarray) -> np.ndarray:
        """int64: the bin of each count, -1 for an unknown count (< 0)."""
        counts = np.asarray(counts, np.int64)
        return np.where(counts >= 0, np.searchsorted(self.lows, counts, side="right") - 1, -1).astype(np.int64)


def occurrence_bins(counts: np.ndarray, max_bins: int) -> OccurrenceBins | None:
    """Bins over the known (>= 0) counts: their distinct values if at most max_bins, else quantile bins
    (at most max_bins, each starting at a count present in the data). None if no count is known."""
    known = np.asarray(counts, np.int64)
    known = known[known >= 0]
    if not len(known):
        return None
    distinct = np.unique(known)
    if len(distinct) <= max_bins:
        kind, lows = "distinct values", distinct
    else:
        kind = "quantiles"
        lows = np.unique(np.quantile(known, np.arange(max_bins) / max_bins, method="lower")).astype(np.int64)
    bin_of = np.searchsorted(lows, known, side="right") - 1
    highs = np.array([known[bin_of == b].max() for b in range(len(lows))], np.int64)
    return OccurrenceBins(kind, lows, highs)


# ----------------------------------------------------------------------------------------------------
# Aggregation into JSON-ready numbers
# ----------------------------------------------------------------------------------------------------

def json_number(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def mean_std(values) -> dict[str, float | None]:
    """Mean and population std (ddof = 0) over draws; None when undefined (no draw or NaN rates)."""
    values = np.asarray(values, float)
    if not len(values) or np.isnan(values).all():
        return {"mean": None, "std": None}
    return {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values))}


def fpr_key(target: float) -> str:
    """The JSON key of a low-FPR target: 0.01 -> "0.01", 0.0 -> "0"."""
    return f"{target:g}"


def rate_intervals(counts: dict[str, float], confidence: float) -> dict[str, dict | None]:
    """Clopper-Pearson interval of every rate over the people it counts: {rate: {"low", "high", "k", "n"}}
    (None when its denominator is 0). Counts may be means over draws: the interval is then taken at the
    mean count (beta quantiles are continuous in k), over the same people."""
    tp, fn, fp, tn = (counts[k] for k in COUNT_KEYS)
    parts = {"TPR": (tp, tp + fn), "FNR": (fn, tp + fn), "FPR": (fp, fp + tn), "TNR": (tn, fp + tn),
             "accuracy": (tp + tn, tp + fn + fp + tn)}
    out = {}
    for key, (k, n) in parts.items():
        n = int(round(n))
        interval = clopper_pearson(min(max(k, 0.0), n), n, confidence) if n else None
        out[key] = None if interval is None else {"low": interval.low, "high": interval.high, "k": k, "n": n}
    return out


def summarise_draws(n: int, stats: list[ScoreStats], counts: dict, config: EvalConfig) -> dict:
    """One row of the per-n table: counts of people, then mean +- std over draws of every number, and the
    interval over people of each rate at its mean count."""
    entry = {"n": n, **counts, "draws": len(stats)}
    for key in COUNT_KEYS:
        entry[key] = mean_std([s.counts[key] for s in stats])
    for key in RATE_KEYS:
        entry[key] = mean_std([s.rates[key] for s in stats])
    entry["intervals"] = (rate_intervals({k: entry[k]["mean"] for k in COUNT_KEYS}, config.confidence)
                          if stats else {k: None for k in RATE_KEYS})
    entry["AUC"] = mean_std([s.auc for s in stats])
    entry["TPR_at_FPR"] = {fpr_key(x): mean_std([s.tpr_at_fpr[i] for s in stats])
                           for i, x in enumerate(config.low_fpr_targets)}
    return entry


def curves_of_draws(stats: list[ScoreStats], n_templates: int) -> dict:
    """Tau sweep (tau 1..T) and ROC (threshold T+1 .. 0) averaged over draws at each threshold."""
    def at(attr: str, t: int) -> dict:
        return mean_std([getattr(s, attr)[t] for s in stats])

    return {
        "tau_sweep": [{"tau": t, "TPR": at("tpr", t), "FPR": at("fpr", t), "accuracy": at("accuracy", t)}
                      for t in range(1, n_templates + 1)],
        "roc": [{"threshold": t, "FPR": at("fpr", t), "TPR": at("tpr", t)} for t in range(n_templates + 1, -1, -1)],
    }


def summarise_full(stats: ScoreStats, counts: dict, images: np.ndarray, n_templates: int,
                   config: EvalConfig) -> dict:
    """The full report (all images of everyone): single numbers, no draws."""
    return {
        **counts,
        "images_per_person": {"min": int(images.min()), "median": float(np.median(images)),
                              "max": int(images.max())},
        **stats.counts,
        **{k: json_number(v) for k, v in stats.rates.items()},
        "intervals": rate_intervals(stats.counts, config.confidence),
        "AUC": json_number(stats.auc),
        "TPR_at_FPR": {fpr_key(x): json_number(v) for x, v in zip(config.low_fpr_targets, stats.tpr_at_fpr)},
        "tau_sweep": [{"tau": t, "TPR": json_number(stats.tpr[t]), "FPR": json_number(stats.fpr[t]),
                       "accuracy": json_number(stats.accuracy[t])} for t in range(1, n_templates + 1)],
        "roc": [{"threshold": t, "FPR": json_number(stats.fpr[t]), "TPR": json_number(stats.tpr[t])}
                for t in range(n_templates + 1, -1, -1)],
    }


