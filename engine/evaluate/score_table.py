"""Every score side by side: paper mode and the continuous scores, each with ROC, AUC and TPR at low FPR,
with bootstrap intervals over persons on the full report and mean +- std over draws at the headline n.

metrics.json "scores": definitions (what each score is, which are not the paper's); censoring (how much of
the margin is an upper bound); full {score: {AUC {value, low, high}, TPR_at_FPR {target: {value, low,
high}}, roc [{threshold, FPR, TPR}]}}; headline {n, draws, score: {AUC, TPR_at_FPR} as {"mean", "std"}};
interval (confidence and method); best_at_lowest_fpr and best_at_zero_fpr (which score has the highest
TPR at the lowest FPR the population resolves, 1 / non-members, and at FPR = 0, against paper mode).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import rankdata

from .intervals import stratified_bootstrap
from .population import ImageDraws, Population, paper_scores
from .scores import SCORE_DEFINITIONS, SCORE_NAMES, ContinuousScores, continuous_scores, roc_curve, tpr_at_fpr
from .statistics import fpr_key, json_number, mean_std, roc_auc

if TYPE_CHECKING:
    from .protocol import EvalConfig


def population_scores(pop: Population, selected: np.ndarray | None = None
                      ) -> tuple[dict[str, np.ndarray], ContinuousScores]:
    """(score name -> float [L] for every person, the continuous scores behind them), from the selected
    images (all if None)."""
    rows = slice(None) if selected is None else selected
    cont = continuous_scores(pop.topk_ids[rows], pop.topk_scores[rows], pop.person_of_image[rows], pop.true_ids)
    return cont.by_name(paper_scores(pop, selected)), cont


def value_with_interval(statistic, scores: np.ndarray, members: np.ndarray, seed: int, resamples: int,
                        confidence: float) -> dict:
    """{"value", "low", "high"} of statistic(member scores, non-member scores) with its stratified bootstrap
    interval over persons; all None when a class is empty."""
    scores, members = np.asarray(scores, float), np.asarray(members, bool)
    if not members.any() or members.all():
        return {"value": None, "low": None, "high": None}
    value = float(statistic(scores[members], scores[~members]))
    interval = stratified_bootstrap(statistic, scores[members], scores[~members], seed, resamples, confidence)
    return {"value": json_number(value), "low": None if interval is None else interval.low,
            "high": None if interval is None else interval.high}


def _value_with_interval(statistic, scores: np.ndarray, members: np.ndarray, config: EvalConfig) -> dict:
    return value_with_interval(statistic, scores, members, config.seed, config.bootstrap_resamples, config.confidence)


# The bootstrap calls a statistic on a batch of resamples at once (arrays [..., n], statistic over the last
# axis); both are closed forms of the definitions in scores.py, and the tests hold them equal.

def auc_statistic(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUC with ties counting 1/2 (Mann-Whitney): (rank sum of members - n_pos (n_pos + 1) / 2) / (n_pos n_neg),
    with average ranks for ties."""
    pos, neg = np.moveaxis(np.asarray(pos, float), axis, -1), np.moveaxis(np.asarray(neg, float), axis, -1)
    n_pos, n_neg = pos.shape[-1], neg.shape[-1]
    ranks = rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    return (ranks[..., :n_pos].sum(axis=-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def tpr_at_fpr_statistic(target: float):
    """TPR at FPR <= target: at most f = floor(target n_neg) non-members may reach the threshold, so the best
    threshold lies just above the (f + 1)-th highest non-member score v, and TPR = share of members above v."""
    def statistic(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
        pos, neg = np.moveaxis(np.asarray(pos, float), axis, -1), np.moveaxis(np.asarray(neg, float), axis, -1)
        n_neg = neg.shape[-1]
        allowed = int(np.floor(target * n_neg + 1e-9))
        if allowed >= n_neg:
            return np.ones(pos.shape[:-1])
        v = np.sort(neg, axis=-1)[..., n_neg - allowed - 1]
        return (pos > v[..., None]).mean(axis=-1)
    return statistic


def _full_entry(scores: np.ndarray, members: np.ndarray, config: EvalConfig) -> dict:
    fpr, tpr, threshold = roc_curve(scores, members)
    return {
        "AUC": _value_with_interval(auc_statistic, scores, members, config),
        "TPR_at_FPR": {fpr_key(x): _value_with_interval(tpr_at_fpr_statistic(x), scores, members, config)
                       for x in config.low_fpr_targets},
        "roc": [{"threshold": None if np.isinf(th) else float(th), "FPR": json_number(f), "TPR": json_number(t)}
                for f, t, th in zip(fpr, tpr, threshold)],
    }


def _lowest_estimable_fpr(non_members: int, targets: tuple[float, ...]) -> float | None:
    """The smallest FPR target a count of non-members can resolve (>= 1 / non-members), else the smallest
    non-zero FPR they can show."""
    if not non_members:
        return None
    resolvable = [t for t in targets if t >= 1 / non_members]
    return min(resolvable) if resolvable else 1 / non_members


def _best_at_lowest_fpr(pop: Population, scores: dict[str, np.ndarray], config: EvalConfig,
                        target: float | None = None) -> dict | None:
    """Which score has the highest TPR at FPR <= target (paper mode included); target None = the lowest FPR
    the population resolves (one false positive, 1 / non-members)."""
    if target is None:
        target = _lowest_estimable_fpr(int((~pop.members).sum()), config.low_fpr_targets)
    if target is None or not pop.members.any() or pop.members.all():
        return None
    tprs = {name: tpr_at_fpr(values, pop.members, target) for name, values in scores.items()}
    best = max(SCORE_NAMES, key=lambda name: (tprs[name], name == "paper"))  # a tie goes to paper mode
    return {"FPR": target, "TPR": {k: json_number(v) for k, v in tprs.items()}, "best": best,
            "beats_paper": bool(tprs[best] > tprs["paper"])}


def scores_section(pop: Population, headline_n: int | None, config: EvalConfig) -> dict:
    """The "scores" section of metrics.json (see the module docstring)."""
    full_scores, cont = population_scores(pop)
    full = {name: _full_entry(values, pop.members, config) for name, values in full_scores.items()}
    headline = None
    if headline_n is not None:
        eligible = pop.images_per_person >= headline_n
        draws = ImageDraws(pop.person_of_image, pop.names, config.seed)
        per_draw: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in SCORE_NAMES}
        members = pop.members[eligible]
        for d in range(config.draws):
            for name, values in population_scores(pop, draws.select(headline_n, d))[0].items():
                values = values[eligible]
                per_draw[name].append((roc_auc(values, members),
                                       [tpr_at_fpr(values, members, x) for x in config.low_fpr_targets]))
        headline = {"n": headline_n, "draws": config.draws, **{
            name: {"AUC": mean_std([a for a, _ in rows]),
                   "TPR_at_FPR": {fpr_key(x): mean_std([t[i] for _, t in rows])
                                  for i, x in enumerate(config.low_fpr_targets)}}
            for name, rows in per_draw.items()}}
    censored = cont.censored[~np.isnan(cont.censored)]
    return {
        "definitions": SCORE_DEFINITIONS,
        "censoring": {"margin_pairs_censored": json_number(float(censored.mean())) if len(censored) else None,
                      "top_k": int(pop.topk_ids.shape[2]),
                      "note": "where the true name is not in a pair's top-k its cosine is only bounded by the "
                              "k-th; the margin uses that bound (query --top-k raises k)"},
        "interval": {"confidence": config.confidence,
                     "method": f"percentile bootstrap over persons, stratified by membership, seed {config.seed}, "
                               f"{config.bootstrap_resamples} resamples"},
        "full": full,
        "headline": headline,
        "best_at_lowest_fpr": _best_at_lowest_fpr(pop, full_scores, config),
        "best_at_zero_fpr": _best_at_lowest_fpr(pop, full_scores, config, 0.0),
    }


def person_score_rows(pop: Population) -> list[list]:
    """One row per evaluated person: name, member, images, then every score (full report)."""
    scores, cont = population_scores(pop)
    images = pop.images_per_person
    return [[name, int(pop.members[i]), int(images[i]), int(scores["paper"][i]),
             *(json_number(float(scores[s][i])) for s in SCORE_NAMES[1:]),
             json_number(float(cont.reference_share[i])), json_number(float(cont.censored[i]))]
            for i, name in enumerate(pop.names)]


PERSON_SCORE_HEADER = ["name", "member", "n_images", "paper", "vote_share", "margin", "calibrated",
                       "reference_share", "margin_censored"]
