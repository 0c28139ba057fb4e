"""Intervals over people and the continuous scores: hand cases, scipy as the oracle, closed forms held equal
to their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from idia_engine.engine.evaluate.intervals import (
    clopper_pearson,
    low_fpr_sentences,
    rate_sentence,
    smallest_provable_fpr,
    stratified_bootstrap,
)
from idia_engine.engine.evaluate.score_table import auc_statistic, tpr_at_fpr_statistic
from idia_engine.engine.evaluate.scores import continuous_scores, roc_curve, tpr_at_fpr
from idia_engine.engine.evaluate.statistics import roc_auc
from scipy import stats


@pytest.mark.parametrize("k,n", [(0, 1), (0, 100), (1, 2), (3, 10), (7, 7), (50, 100), (1, 1000), (999, 1000)])
def test_clopper_pearson_equals_scipys_exact_interval(k, n):
    ours = clopper_pearson(k, n)
    theirs = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    assert ours.low == pytest.approx(theirs.low, abs=1e-12) and ours.high == pytest.approx(theirs.high, abs=1e-12)


def test_clopper_pearson_hand_values_and_edges():
    # 0 of 100: 1 - 0.025^(1/100); n of n: 0.025^(1/n)
    assert clopper_pearson(0, 100).high == pytest.approx(1 - 0.025 ** (1 / 100), abs=1e-12)
    assert clopper_pearson(0, 100).low == 0.0 and clopper_pearson(2, 2).high == 1.0
    assert clopper_pearson(2, 2).low == pytest.approx(0.025 ** 0.5, abs=1e-12)
    assert clopper_pearson(3, 0) is None
    with pytest.raises(ValueError):
        clopper_pearson(5, 4)
    # a mean count over draws lies between its whole neighbours
    low, mid, high = clopper_pearson(3, 10), clopper_pearson(3.5, 10), clopper_pearson(4, 10)
    assert low.low < mid.low < high.low and low.high < mid.high < high.high


def test_the_sentences_say_what_the_population_can_show():
    assert rate_sentence("FPR", 0, 100, "non-members") == "0 of 100 non-members: FPR <= 3.6 % at 95 %"
    assert rate_sentence("TPR", 10, 10, "members") == "10 of 10 members: TPR >= 69.2 % at 95 %"
    assert rate_sentence("FPR", 5, 100, "non-members") == \
        "5 of 100 non-members: FPR = 5 %, between 1.6 % and 11.3 % at 95 %"
    assert rate_sentence("FPR", 0, 0, "non-members") == "no non-members: FPR is undefined"
    # with 100 non-members neither 1 % nor 0.1 % can be shown; 0 is no target (FPR = 0 is never provable)
    sentences = low_fpr_sentences(100, (0.01, 0.001, 0.0))
    assert len(sentences) == 2 and "backed by 100 non-members" in sentences[0] and "FPR <= 3.6 %" in sentences[0]
    needed = int(sentences[0].split("at least ")[1].split()[0])
    assert clopper_pearson(0, needed).high <= 0.01 < clopper_pearson(0, needed - 1).high
    assert low_fpr_sentences(needed, (0.01,)) == []
    assert smallest_provable_fpr(0) is None


def _random_scores(rng, n_pos, n_neg, levels):
    return rng.integers(0, levels, n_pos).astype(float), rng.integers(0, levels, n_neg).astype(float)


def test_the_closed_forms_equal_their_definitions():
    rng = np.random.default_rng(0)
    for trial in range(40):
        pos, neg = _random_scores(rng, int(rng.integers(1, 30)), int(rng.integers(1, 30)), int(rng.integers(1, 8)))
        scores, members = np.r_[pos, neg], np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
        assert auc_statistic(pos, neg) == pytest.approx(roc_auc(scores, members), abs=1e-12)
        for target in (0.0, 0.01, 0.1, 0.34, 0.5, 0.99):
            assert tpr_at_fpr_statistic(target)(pos, neg) == pytest.approx(tpr_at_fpr(scores, members, target))
    # batched: one value per resample row
    pos = np.array([[1.0, 2, 3], [3, 3, 3]])
    neg = np.array([[0.0, 1], [3, 4]])
    np.testing.assert_allclose(auc_statistic(pos, neg), [5.5 / 6, 1.5 / 6])


def test_roc_curve_runs_from_zero_to_one():
    fpr, tpr, threshold = roc_curve(np.array([0.9, 0.5, 0.5, 0.1]), np.array([True, True, False, False]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    assert np.isinf(threshold[0]) and list(threshold[1:]) == [0.9, 0.5, 0.1]


def test_the_bootstrap_is_seeded_stratified_and_contains_the_value():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, 40), rng.normal(0, 1, 60)
    a = stratified_bootstrap(auc_statistic, pos, neg, seed=3, resamples=500)
    assert a == stratified_bootstrap(auc_statistic, pos, neg, seed=3, resamples=500)
    assert a != stratified_bootstrap(auc_statistic, pos, neg, seed=4, resamples=500)
    assert a.low < auc_statistic(pos, neg) < a.high and 0.5 < a.low and "stratified" in a.method
    sizes = set()

    def record(p, n, axis=-1):
        sizes.add((p.shape[-1], n.shape[-1]))
        return auc_statistic(p, n, axis)
    stratified_bootstrap(record, pos, neg, seed=0, resamples=200)
    assert sizes == {(40, 60)}  # every resample keeps both classes' sizes
    point = stratified_bootstrap(auc_statistic, np.ones(5), np.zeros(5), seed=0, resamples=200)
    assert point.low == point.high == 1.0
    assert stratified_bootstrap(auc_statistic, np.ones(5), np.zeros(0), seed=0) is None
    assert stratified_bootstrap(auc_statistic, np.ones(1), np.zeros(1), seed=0) is None  # 1 + 1 people


def test_continuous_scores_by_hand():
    """Two people (true ids 0 and 1), T = 2, k = 2, candidates 0, 1, 2.

    p0 photo a: t0 [0 .9, 2 .5] (true top-1, lead .4)  t1 [2 .8, 0 .6] (rank 2, margin -.2)
    p0 photo b: t0 [1 .7, 2 .6] (true absent: bound .6-.7 = -.1)  t1 [0 .5, 1 .5] (tie on top, lead 0)
    p1 photo c: t0 [1 .9, 0 .3] (true top-1, lead .6)  t1 [0 .8, 1 .7] (rank 2, margin -.1)
    """
    ids = np.array([[[0, 2], [2, 0]], [[1, 2], [0, 1]], [[1, 0], [0, 1]]])
    cos = np.array([[[.9, .5], [.8, .6]], [[.7, .6], [.5, .5]], [[.9, .3], [.8, .7]]])
    s = continuous_scores(ids, cos, np.array([0, 0, 1]), np.array([0, 1]))
    np.testing.assert_allclose(s.vote_share, [2 / 4, 1 / 2])
    np.testing.assert_allclose(s.margin, [(.4 - .2 - .1 + 0) / 4, (.6 - .1) / 2])
    np.testing.assert_allclose(s.censored, [1 / 4, 0])
    # name 0 is top-1 in 1 of p1's 2 pairs; name 1 in 1 of p0's 4 pairs
    np.testing.assert_allclose(s.reference_share, [1 / 2, 1 / 4])
    np.testing.assert_allclose(s.calibrated, [0, 1 / 4])
    # a name that is no candidate never wins and its margin is an upper bound everywhere
    s = continuous_scores(ids, cos, np.array([0, 0, 1]), np.array([-2, 1]))
    assert s.vote_share[0] == 0 and s.censored[0] == 1 and s.reference_share[0] == 0
