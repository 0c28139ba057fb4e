"""Paper-mode vote rule (docs/attack.md, steps 4-6): the vectorised engine against a plain oracle.

The oracle below is written independently of engine/attack.py, with Python loops and collections.Counter:
- step 4: per image and template, the predicted name is the arg-max of the similarity over all names
  (ties in similarity broken by the lowest id);
- step 5: per person and template, the most frequent predicted name must be the unique mode (a tie for
  first place counts as wrong); plurality, not > 50 %;
- step 6: score = number of templates whose unique mode is the true name; member iff score >= tau.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from idia_engine.engine.errors import InputError
from idia_engine.engine.query.votes import NO_MODE, check_tau, paper_mode_votes

N_PAPER_TEMPLATES = 21


# ----------------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------------

def oracle_argmax(sims_per_template):
    """sims_per_template: T lists of M rows of N floats -> top1[m][t], ties broken by the lowest id."""
    n_templates = len(sims_per_template)
    n_images = len(sims_per_template[0]) if n_templates else 0
    top1 = [[None] * n_templates for _ in range(n_images)]
    for t in range(n_templates):
        for m in range(n_images):
            row = sims_per_template[t][m]
            best_id, best_sim = 0, row[0]
            for name_id in range(1, len(row)):
                if row[name_id] > best_sim:  # strictly greater: an equal later id never wins
                    best_id, best_sim = name_id, row[name_id]
            top1[m][t] = best_id
    return top1


def oracle_votes(top1, person_of_image, true_ids, n_templates):
    """Plain per-person, per-template vote. Returns a dict of lists shaped like the engine's result."""
    n_persons = len(true_ids)
    images_of = [[] for _ in range(n_persons)]
    for m, p in enumerate(person_of_image):
        images_of[p].append(m)
    out = {"n_images": [], "modes": [], "mode_votes": [], "true_votes": [], "hits": [], "scores": []}
    for p in range(n_persons):
        modes, mode_votes, true_votes, hits = [], [], [], []
        for t in range(n_templates):
            counts = Counter(top1[m][t] for m in images_of[p])
            if not counts:
                modes.append(NO_MODE)
                mode_votes.append(0)
                true_votes.append(0)
                hits.append(False)
                continue
            top_count = max(counts.values())
            leaders = [name for name, c in counts.items() if c == top_count]
            mode = leaders[0] if len(leaders) == 1 else NO_MODE
            modes.append(mode)
            mode_votes.append(top_count)
            true_votes.append(counts.get(true_ids[p], 0))
            hits.append(mode == true_ids[p])
        out["n_images"].append(len(images_of[p]))
        out["modes"].append(modes)
        out["mode_votes"].append(mode_votes)
        out["true_votes"].append(true_votes)
        out["hits"].append(hits)
        out["scores"].append(sum(1 for h in hits if h))
    return out


def oracle_decisions(scores, tau):
    return [s >= tau for s in scores]


def assert_engine_matches_oracle(result, expected, n_templates):
    n_persons = len(expected["scores"])
    assert result.scores.shape == (n_persons,)
    for field in ("modes", "mode_votes", "true_votes", "hits"):
        assert getattr(result, field).shape == (n_persons, n_templates), field
    assert result.n_images.tolist() == expected["n_images"]
    assert result.modes.tolist() == expected["modes"]
    assert result.mode_votes.tolist() == expected["mode_votes"]
    assert result.true_votes.tolist() == expected["true_votes"]
    assert result.hits.tolist() == expected["hits"]
    assert result.scores.tolist() == expected["scores"]
    assert result.hits.dtype == np.bool_
    for tau in (0, 1, 2, n_templates, n_templates + 1):
        assert result.decisions(tau).tolist() == oracle_decisions(expected["scores"], tau)


# ----------------------------------------------------------------------------------------------------
# The oracle itself, on cases worked out by hand (so a wrong oracle cannot hide a wrong engine)
# ----------------------------------------------------------------------------------------------------

def test_oracle_argmax_breaks_similarity_ties_by_lowest_id():
    sims = [[[0.1, 0.5, 0.5, 0.2], [0.9, 0.9, 0.1, 0.9]]]  # T=1, M=2, N=4
    assert oracle_argmax(sims) == [[1], [0]]


def test_oracle_votes_by_hand():
    # One person, 5 images, 2 templates: t0 votes 7,7,3,3,9 (tie -> NO_MODE), t1 votes 7,7,3,4,9 (hit).
    top1 = [[7, 7], [7, 7], [3, 3], [3, 4], [9, 9]]
    got = oracle_votes(top1, [0] * 5, [7], 2)
    assert got["modes"] == [[NO_MODE, 7]]
    assert got["scores"] == [1]
    assert got["mode_votes"] == [[2, 2]]


# ----------------------------------------------------------------------------------------------------
# Hand-made cases against the engine
# ----------------------------------------------------------------------------------------------------

def _single_template(votes_per_person, true_ids):
    """votes_per_person: list of lists of predicted ids -> (top1 [M,1], person_of_image [M])."""
    top1, person = [], []
    for p, votes in enumerate(votes_per_person):
        for v in votes:
            top1.append([v])
            person.append(p)
    return np.array(top1, dtype=np.int64).reshape(-1, 1), np.array(person, dtype=np.int64), np.array(true_ids)


def test_plurality_tie_with_true_name_counts_as_wrong():
    # 5 images: true name 0 gets 2 votes, name 4 gets 1, name 5 gets 2 -> tie for first place -> wrong.
    top1, person, true = _single_template([[0, 4, 5, 0, 5]], [0])
    r = paper_mode_votes(top1, person, true)
    assert r.modes.tolist() == [[NO_MODE]]
    assert r.hits.tolist() == [[False]]
    assert r.scores.tolist() == [0]
    assert r.mode_votes.tolist() == [[2]]
    assert r.true_votes.tolist() == [[2]]
    assert r.n_images.tolist() == [5]


def test_plurality_below_half_is_a_hit():
    # 5 images: true name 0 gets 2 votes (40 %), three others 1 each -> unique plurality -> hit.
    top1, person, true = _single_template([[3, 0, 4, 0, 5]], [0])
    r = paper_mode_votes(top1, person, true)
    assert r.modes.tolist() == [[0]]
    assert r.hits.tolist() == [[True]]
    assert r.scores.tolist() == [1]
    assert r.mode_votes.tolist() == [[2]]
    assert r.true_votes.tolist() == [[2]]


def test_unique_wrong_mode_is_a_miss_not_a_tie():
    top1, person, true = _single_template([[3, 3, 0, 3, 0]], [0])
    r = paper_mode_votes(top1, person, true)
    assert r.modes.tolist() == [[3]]
    assert r.hits.tolist() == [[False]]
    assert r.mode_votes.tolist() == [[3]]
    assert r.true_votes.tolist() == [[2]]


def test_tie_for_first_place_without_the_true_name():
    top1, person, true = _single_template([[3, 4, 3, 4, 0]], [0])
    r = paper_mode_votes(top1, person, true)
    assert r.modes.tolist() == [[NO_MODE]]
    assert r.true_votes.tolist() == [[1]]
    assert r.scores.tolist() == [0]


def test_tie_for_second_place_does_not_matter():
    top1, person, true = _single_template([[0, 0, 0, 4, 4, 5, 5]], [0])
    r = paper_mode_votes(top1, person, true)
    assert r.modes.tolist() == [[0]]
    assert r.hits.tolist() == [[True]]


def test_single_image_is_its_own_mode():
    top1, person, true = _single_template([[2], [9]], [2, 1])
    r = paper_mode_votes(top1, person, true)
    assert r.modes.tolist() == [[2], [9]]
    assert r.hits.tolist() == [[True], [False]]
    assert r.mode_votes.tolist() == [[1], [1]]
    assert r.true_votes.tolist() == [[1], [0]]
    assert r.scores.tolist() == [1, 0]


def test_two_images_that_disagree_are_a_tie():
    top1, person, true = _single_template([[2, 3]], [2])
    r = paper_mode_votes(top1, person, true)
    assert r.modes.tolist() == [[NO_MODE]]
    assert r.scores.tolist() == [0]


def test_person_without_images_scores_zero():
    # Person 1 has no image (it sits between two persons that have some).
    top1 = np.array([[5, 5, 5], [5, 6, 5], [7, 7, 8]])
    person = np.array([0, 0, 2])
    true = np.array([5, 5, 7])
    r = paper_mode_votes(top1, person, true)
    assert r.n_images.tolist() == [2, 0, 1]
    assert r.modes.tolist() == [[5, NO_MODE, 5], [NO_MODE] * 3, [7, 7, 8]]
    assert r.mode_votes[1].tolist() == [0, 0, 0]
    assert r.true_votes[1].tolist() == [0, 0, 0]
    assert r.hits[1].tolist() == [False, False, False]
    assert r.scores.tolist() == [2, 0, 2]


def test_no_image_at_all():
    r = paper_mode_votes(np.zeros((0, N_PAPER_TEMPLATES), np.int64), np.zeros(0, np.int64), np.array([3, 4]))
    assert r.n_images.tolist() == [0, 0]
    assert (r.modes == NO_MODE).all() and r.modes.shape == (2, N_PAPER_TEMPLATES)
    assert r.scores.tolist() == [0, 0]
    assert r.decisions(1).tolist() == [False, False]
    assert r.decisions(0).tolist() == [True, True]


def test_templates_are_voted_separately_not_averaged():
    # Template 0 is a hit, template 1 a tie, template 2 a wrong unique mode: score 1.
    top1 = np.array([[1, 1, 2], [1, 2, 2], [3, 1, 1], [1, 2, 2]])
    r = paper_mode_votes(top1, np.zeros(4, np.int64), np.array([1]))
    assert r.modes.tolist() == [[1, NO_MODE, 2]]
    assert r.hits.tolist() == [[True, False, False]]
    assert r.true_votes.tolist() == [[3, 2, 1]]
    assert r.scores.tolist() == [1]


def test_images_of_a_person_need_not_be_contiguous():
    # Persons interleaved: 0,1,0,1,0. Person 0 votes 4,4,9 -> hit; person 1 votes 9,4 -> tie.
    top1 = np.array([[4], [9], [4], [4], [9]])
    person = np.array([0, 1, 0, 1, 0])
    r = paper_mode_votes(top1, person, np.array([4, 9]))
    assert r.modes.tolist() == [[4], [NO_MODE]]
    assert r.scores.tolist() == [1, 0]


def test_large_candidate_ids():
    big = 10**9 + 7
    top1 = np.array([[big], [big], [big - 1]])
    r = paper_mode_votes(top1, np.zeros(3, np.int64), np.array([big]))
    assert r.modes.tolist() == [[big]]
    assert r.scores.tolist() == [1]


def test_decisions_for_tau_0_1_21():
    # Four persons, 21 templates, scores 0, 1, 20, 21 (person 3 has every template right).
    t = N_PAPER_TEMPLATES
    rows, person = [], []
    true = [10, 11, 12, 13]
    wrong = 99
    for p, n_right in enumerate([0, 1, 20, 21]):
        row = [true[p]] * n_right + [wrong] * (t - n_right)
        rows.append(row)
        person.append(p)
    r = paper_mode_votes(np.array(rows), np.array(person), np.array(true))
    assert r.scores.tolist() == [0, 1, 20, 21]
    assert r.decisions(0).tolist() == [True, True, True, True]
    assert r.decisions(1).tolist() == [False, True, True, True]
    assert r.decisions(21).tolist() == [False, False, False, True]
    assert r.decisions(22).tolist() == [False, False, False, False]
    assert r.decisions(1).dtype == np.bool_


# ----------------------------------------------------------------------------------------------------
# Random structured cases: engine vs oracle
# ----------------------------------------------------------------------------------------------------

def structured_case(seed: int, n_templates: int):
    """Votes that tie often: each person's images predict from a few plausible names, biased to the truth.

    Returns (top1 as a list of lists, person_of_image, true_ids).
    """
    rng = np.random.default_rng(seed)
    n_persons = int(rng.integers(1, 9))
    n_names = int(rng.integers(n_persons + 2, n_persons + 12))
    true_ids = [int(x) for x in rng.choice(n_names, size=n_persons, replace=False)]
    top1, person_of_image = [], []
    for p in range(n_persons):
        # Zero images for about one person in seven.
        n_img = 0 if rng.random() < 0.15 else int(rng.integers(1, 8))
        others = [int(x) for x in rng.choice(n_names, size=3) if x != true_ids[p]]
        plausible = [true_ids[p]] + others
        bias = float(rng.uniform(0.2, 0.7))  # strength of the true name, varies from person to person
        weights = np.array([bias] + [(1 - bias) / max(len(others), 1)] * len(others))
        weights = weights / weights.sum()
        for _ in range(n_img):
            row = []
            for _t in range(n_templates):
                if rng.random() < 0.08:  # a stray prediction far from the plausible set
                    row.append(int(rng.integers(0, n_names)))
                else:
                    row.append(int(plausible[rng.choice(len(plausible), p=weights)]))
            top1.append(row)
            person_of_image.append(p)
    order = rng.permutation(len(top1))  # images arrive in any order
    top1 = [top1[i] for i in order]
    person_of_image = [person_of_image[i] for i in order]
    return top1, person_of_image, true_ids


@pytest.mark.parametrize("n_templates", [1, 3, N_PAPER_TEMPLATES])
def test_engine_matches_oracle_on_structured_random_votes(n_templates):
    n_cases, n_ties, n_hits, n_empty = 150, 0, 0, 0
    for seed in range(n_cases):
        top1, person, true_ids = structured_case(seed * 31 + n_templates, n_templates)
        expected = oracle_votes(top1, person, true_ids, n_templates)
        top1_arr = np.array(top1, dtype=np.int64).reshape(len(top1), n_templates)
        result = paper_mode_votes(top1_arr, np.array(person, dtype=np.int64), np.array(true_ids))
        assert_engine_matches_oracle(result, expected, n_templates)
        for p, modes in enumerate(expected["modes"]):
            n_ties += sum(1 for m in modes if m == NO_MODE) if expected["n_images"][p] else 0
            n_empty += expected["n_images"][p] == 0
        n_hits += sum(expected["scores"])
    # The generator must exercise ties, hits and image-less persons, or the comparison proves little.
    assert n_ties > 20 and n_hits > 20 and n_empty > 5


# ----------------------------------------------------------------------------------------------------
# Dense similarities from structured synthetic embeddings: oracle (step 4 + 5 + 6) vs engine given argmax
# ----------------------------------------------------------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


IMAGE_COSINE = 0.3


def image_near(direction: np.ndarray, rng: np.random.Generator, cosine: float) -> np.ndarray:
    """A unit vector at exactly `cosine` from the unit vector `direction`, otherwise random."""
    noise = rng.normal(size=direction.shape)
    noise = _unit(noise - (noise @ direction) * direction)
    return cosine * direction + np.sqrt(1 - cosine**2) * noise


def synthetic_dense_case(seed: int, n_templates: int, n_names: int = 60, n_persons: int = 12, dim: int = 64):
    """Text embeddings [T, N, D]: one base vector per name plus a small per-template shift (correlated
    across templates). Images lie near their true name's base vector at cosine ~0.3, so the arg-max is
    right only sometimes. Names 1 and 0 share the same embedding, so similarities tie exactly."""
    rng = np.random.default_rng(seed)
    base = _unit(rng.normal(size=(n_names, dim)))
    base[1] = base[0]  # an exact duplicate: similarity ties broken by the lowest id
    text = _unit(base[None, :, :] + 0.3 * _unit(rng.normal(size=(n_templates, n_names, dim))))
    text[:, 1] = text[:, 0]
    true_ids = rng.choice(np.arange(2, n_names), size=n_persons - 1, replace=False).tolist()
    true_ids = [1] + true_ids  # person 0's true name is the duplicate that always loses the tie
    images, person = [], []
    for p in range(n_persons):
        n_img = 0 if p == n_persons - 1 else int(rng.integers(1, 8))
        for _ in range(n_img):
            images.append(image_near(base[true_ids[p]], rng, IMAGE_COSINE))
            person.append(p)
    images = np.array(images)
    sims = np.einsum("md,tnd->tmn", images, text)  # [T, M, N]
    return sims, np.array(person), np.array(true_ids)


@pytest.mark.parametrize("n_templates", [1, 3, N_PAPER_TEMPLATES])
def test_engine_matches_oracle_from_dense_similarities(n_templates):
    total_hits = total_misses = total_ties = 0
    for seed in range(4):
        sims, person, true_ids = synthetic_dense_case(seed, n_templates)
        expected = oracle_votes(oracle_argmax(sims.tolist()), person.tolist(), true_ids.tolist(), n_templates)
        top1 = np.argmax(sims, axis=2).T  # [M, T]
        result = paper_mode_votes(top1, person, true_ids)
        assert_engine_matches_oracle(result, expected, n_templates)
        assert result.scores[0] == 0  # the true name 1 always loses the similarity tie to name 0
        assert result.scores[-1] == 0 and result.n_images[-1] == 0
        with_images = result.n_images > 0
        total_hits += int(result.hits.sum())
        total_misses += int((~result.hits[with_images]).sum())
        total_ties += int((result.modes[with_images] == NO_MODE).sum())
    # The signal is strong enough for hits, weak enough for misses and ties.
    assert total_hits > 0 and total_misses > 0 and total_ties > 0


def test_image_near_has_the_asked_cosine():
    rng = np.random.default_rng(0)
    direction = _unit(rng.normal(size=32))
    for _ in range(5):
        img = image_near(direction, rng, IMAGE_COSINE)
        assert np.linalg.norm(img) == pytest.approx(1.0, abs=1e-9)
        assert img @ direction == pytest.approx(IMAGE_COSINE, abs=1e-9)


@pytest.mark.parametrize(("tau", "n_templates", "needle"), [
    (0, 21, "--tau must be >= 1, got 0; use 1..21"),
    (-3, 21, "got -3"),
    (22, 21, "--tau 22 exceeds the number of templates (21)"),
    (True, 21, "whole number"),
    (1.5, 21, "whole number"),
])
def test_check_tau_is_one_rule_for_query_and_evaluate(tau, n_templates, needle):
    with pytest.raises(InputError) as info:
        check_tau(tau, n_templates)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("tau", [1, 7, 21])
def test_check_tau_accepts_1_to_t(tau):
    check_tau(tau, 21)
