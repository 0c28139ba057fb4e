"""The evaluation protocol (docs/attack.md, step 8) over a hand-made report: numbers worked out on paper.

The hand case: T = 3 templates, candidates Anna=0, Bob=1, Carl=2, Dora=3, "Fake One"=4. Top-1 predictions
per image (one id per template) and what follows from the unique-plurality vote:

    Anna (member, true 0):      a0 [0,0,0]  a1 [0,0,1]  a2 [0,1,2]
        all 3 images: t0 {0:3} hit; t1 {0:2,1:1} hit; t2 {0,1,2} tie -> score 2
        one image:    a0 -> 3, a1 -> 2, a2 -> 1
    Bob (member, true 1):       b0 [1,4,4]  b1 [2,4,1]  b2 [3,1,1]
        all 3: t0 {1,2,3} tie; t1 {4:2,1:1} mode 4; t2 {4:1,1:2} hit -> score 1
        one image:    b0 -> 1, b1 -> 1, b2 -> 2
    Carl (non-member, true 2):  c0 [2,4,4]  c1 [2,3,4]  c2 [0,3,4]
        all 3: t0 {2:2,0:1} hit; t1 mode 3; t2 mode 4 -> score 1
        one image:    c0 -> 1, c1 -> 1, c2 -> 0
    Dora (non-member, true 3):  d0 [4,4,4]  d1 [4,0,0]   (only 2 images: left out at n = 3)
        all 2: score 0; one image: 0

Full report (scores A2 B1 | C1 D0): at tau 1 TP 2, FN 0, FP 1 (Carl), TN 1; TPR 1, FPR 1/2, accuracy 3/4.
AUC: pairs (A,C) 1, (A,D) 1, (B,C) tie 1/2, (B,D) 1 -> 3.5/4 = 0.875; ROC points (threshold 4..0):
(0,0) (0,0) (0,1/2) (1/2,1) (1,1); trapezoid 1/2*(1/2+1)/2 + 1/2*1 = 0.875. TPR at FPR = 0: 1/2.
n = 3 (Dora left out; every draw is all images): A2 B1 | C1 -> TPR 1, FPR 1, TNR 0, accuracy 2/3;
AUC (1 + 1/2)/2 = 0.75; TPR at FPR = 0: 1/2 (tau 2 keeps Anna only). Std over draws 0.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from idia_engine.engine.errors import (
    ArtifactError,
    ArtifactExistsError,
    IdiaError,
    InputError,
)
from idia_engine.engine.evaluate.population import NOT_A_CANDIDATE, ImageDraws
from idia_engine.engine.evaluate.protocol import PAPER_N_VALUES, EvalConfig, compute_evaluation, evaluate_report
from idia_engine.engine.evaluate.statistics import best_tpr_at_fpr, occurrence_bins, roc_auc, threshold_counts
from idia_engine.engine.query.labels import read_label_table, read_labels
from idia_engine.engine.query.report import (
    REPORT_ARTIFACT,
    REPORT_SCHEMA_VERSION,
    write_images_csv,
    write_summary,
)

CANDIDATES = ["Anna", "Bob", "Carl", "Dora", "Fake One"]
HAND_IMAGES = {  # image label -> (person, top-1 id per template)
    "a0": ("Anna", [0, 0, 0]), "a1": ("Anna", [0, 0, 1]), "a2": ("Anna", [0, 1, 2]),
    "b0": ("Bob", [1, 4, 4]), "b1": ("Bob", [2, 4, 1]), "b2": ("Bob", [3, 1, 1]),
    "c0": ("Carl", [2, 4, 4]), "c1": ("Carl", [2, 3, 4]), "c2": ("Carl", [0, 3, 4]),
    "d0": ("Dora", [4, 4, 4]), "d1": ("Dora", [4, 0, 0]),
}
SCORE_OF_ONE_IMAGE = {"a0": 3, "a1": 2, "a2": 1, "b0": 1, "b1": 1, "b2": 2, "c0": 1, "c1": 1, "c2": 0,
                      "d0": 0, "d1": 0}  # worked out on paper (module docstring)
MEMBERS = {"Anna": True, "Bob": True, "Carl": False, "Dora": False}
SMALL = EvalConfig(n_values=(1, 3), draws=20, seed=7)


# ----------------------------------------------------------------------------------------------------
# A report written by hand, the way engine/report.py lays it out
# ----------------------------------------------------------------------------------------------------

def write_report(root: Path, images: dict[str, tuple[str, list[int]]], candidates: list[str],
                 labels_file: Path | None = None, without_images: list[str] = ()) -> Path:
    pred = root / "predictions"
    pred.mkdir(parents=True)
    top1 = np.array([ids for _, ids in images.values()], np.int32).reshape(len(images), -1)
    second = (top1 + 1) % len(candidates)  # a k = 2 report: evaluation must read rank 0 only
    np.save(pred / "topk_ids.npy", np.stack([top1, second], axis=2))
    np.save(pred / "topk_scores.npy", np.stack([np.full(top1.shape, 0.9), np.full(top1.shape, 0.8)], 2)
            .astype(np.float32))
    write_images_csv(pred / "images.csv", [(person, f"/faces/{person}/{label}.jpg", f"sha-{label}")
                                           for label, (person, _) in images.items()])
    (pred / "candidates.txt").write_text("".join(c + "\n" for c in candidates), encoding="utf-8")
    write_summary(root, {
        "schema_version": REPORT_SCHEMA_VERSION, "artifact": REPORT_ARTIFACT, "created_at": "2024-01-01T00:00:00+00:00",
        "mode": "paper",
        "parameters": {"labels_file": str(labels_file) if labels_file else None, "tau": 1, "top_k": 2},
        "counts": {"persons": 4}, "persons_without_images": list(without_images),
        "files": {"persons.csv": "kept as is"}, "metrics": {"TPR": 1.0},
    })
    return root


def write_labels(path: Path, rows: dict[str, bool], occurrences: dict[str, str] | None = None) -> Path:
    lines = ["name,member" + (",occurrences" if occurrences is not None else "")]
    for name, member in rows.items():
        extra = f",{occurrences.get(name, '')}" if occurrences is not None else ""
        lines.append(f"{name},{int(member)}{extra}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def hand_report(tmp_path) -> tuple[Path, Path]:
    labels = write_labels(tmp_path / "labels.csv", MEMBERS)
    return write_report(tmp_path / "report", HAND_IMAGES, CANDIDATES, labels), labels


@pytest.fixture(scope="module")
def hand_metrics(tmp_path_factory) -> dict:
    """The hand case evaluated once (numbers only, nothing written), labels taken from summary.json."""
    root = tmp_path_factory.mktemp("hand")
    labels = write_labels(root / "labels.csv", MEMBERS)
    return compute_evaluation(write_report(root / "report", HAND_IMAGES, CANDIDATES, labels), None, SMALL)


def no_nan_json(path: Path) -> dict:
    def refuse(token):
        raise AssertionError(f"{path} holds {token}; undefined numbers must be null")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def by_n(metrics: dict, n: int) -> dict:
    return next(e for e in metrics["by_n"] if e["n"] == n)


def approx(x):
    return pytest.approx(x, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# Hand-computed numbers
# ----------------------------------------------------------------------------------------------------

def test_full_report_numbers(hand_metrics):
    full = hand_metrics["full"]
    assert (full["persons"], full["members"], full["non_members"]) == (4, 2, 2)
    assert (full["TP"], full["FN"], full["FP"], full["TN"]) == (2, 0, 1, 1)
    assert full["TPR"] == approx(1) and full["FNR"] == approx(0)
    assert full["FPR"] == approx(0.5) and full["TNR"] == approx(0.5) and full["accuracy"] == approx(0.75)
    assert full["AUC"] == approx(0.875)
    assert full["TPR_at_FPR"] == {"0.01": approx(0.5), "0.001": approx(0.5), "0": approx(0.5)}
    assert [(p["tau"], p["TPR"], p["FPR"]) for p in full["tau_sweep"]] == [(1, 1, 0.5), (2, 0.5, 0), (3, 0, 0)]
    assert [(p["threshold"], p["FPR"], p["TPR"]) for p in full["roc"]] == [
        (4, 0, 0), (3, 0, 0), (2, 0, 0.5), (1, 0.5, 1), (0, 1, 1)]
    assert full["images_per_person"] == {"min": 2, "median": 3.0, "max": 3}


def test_n_equal_to_all_images_and_left_out_person(hand_metrics):
    m = hand_metrics
    e = by_n(m, 3)
    assert (e["persons"], e["members"], e["non_members"]) == (3, 2, 1)
    assert (e["left_out"], e["left_out_members"], e["left_out_non_members"]) == (1, 0, 1)  # Dora: 2 images
    assert {k: e[k]["mean"] for k in ("TP", "FN", "FP", "TN")} == {"TP": 2, "FN": 0, "FP": 1, "TN": 0}
    expected = {"TPR": 1, "FNR": 0, "FPR": 1, "TNR": 0, "accuracy": 2 / 3, "AUC": 0.75}
    for key, value in expected.items():
        assert e[key] == {"mean": approx(value), "std": approx(0)}, key
    assert e["TPR_at_FPR"]["0"] == {"mean": approx(0.5), "std": approx(0)}
    assert any("left out" in note and "n = 3: 1" in note for note in m["notes"])


def test_n_one_per_draw_matches_the_hand_table(hand_metrics):
    m = hand_metrics
    names = list(MEMBERS)
    person_of_image = np.array([names.index(p) for p, _ in HAND_IMAGES.values()])
    draws = ImageDraws(person_of_image, names, SMALL.seed)
    per_draw = {k: [] for k in ("TPR", "FPR", "TNR", "accuracy", "FP", "AUC")}
    for d in range(SMALL.draws):
        chosen = [label for label, keep in zip(HAND_IMAGES, draws.select(1, d)) if keep]
        assert len(chosen) == 4  # one image of each person
        score = {HAND_IMAGES[label][0]: SCORE_OF_ONE_IMAGE[label] for label in chosen}
        carl_positive = score["Carl"] >= 1  # Anna, Bob always >= 1; Dora always 0
        per_draw["TPR"].append(1.0)
        per_draw["FP"].append(int(carl_positive))
        per_draw["FPR"].append(0.5 * carl_positive)
        per_draw["TNR"].append(1 - 0.5 * carl_positive)
        per_draw["accuracy"].append((2 + 2 - carl_positive) / 4)
        pairs = [(score[a], score[b]) for a in ("Anna", "Bob") for b in ("Carl", "Dora")]
        per_draw["AUC"].append(sum(1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs) / 4)
    e = by_n(m, 1)
    assert (e["persons"], e["left_out"], e["draws"]) == (4, 0, 20)
    for key, values in per_draw.items():
        assert e[key]["mean"] == approx(statistics.fmean(values)), key
        assert e[key]["std"] == approx(statistics.pstdev(values)), key
    assert len(set(per_draw["FP"])) == 2  # the draws do differ (Carl's c2 is drawn sometimes, not always)


def test_headline_falls_back_to_largest_n_with_people(hand_metrics):
    m = hand_metrics  # headline_n 30: nobody has 30 images
    h = m["headline"]
    assert (h["n"], h["n_requested"]) == (3, 30)
    assert any("headline numbers use n = 3" in note for note in m["notes"])
    assert [(p["tau"], p["TPR"]["mean"], p["FPR"]["mean"]) for p in h["tau_sweep"]] == [
        (1, 1, 1), (2, 0.5, 0), (3, 0, 0)]
    assert h["roc"][0]["threshold"] == 4 and h["roc"][-1]["threshold"] == 0
    assert h["AUC"]["mean"] == approx(0.75)


def test_headline_n_not_in_the_sweep_is_computed(hand_report):
    report, labels = hand_report
    m = compute_evaluation(report, labels, EvalConfig(n_values=(1,), draws=3, headline_n=3))
    assert [e["n"] for e in m["by_n"]] == [1]
    assert m["headline"]["n"] == 3 and m["headline"]["FPR"]["mean"] == approx(1)


def test_tau_two(hand_report):
    report, labels = hand_report
    m = compute_evaluation(report, labels, EvalConfig(n_values=(3,), draws=2, tau=2))
    assert (m["full"]["TPR"], m["full"]["FPR"]) == (0.5, 0.0)  # Anna (2) in, Bob (1) out; Carl (1) out
    assert by_n(m, 3)["TPR"]["mean"] == approx(0.5)


def test_recorded_labels_are_used_when_none_given(hand_metrics):
    assert hand_metrics["labels"]["file"].endswith("labels.csv")
    assert "summary.json" in hand_metrics["labels"]["source"]


def test_given_labels_win_over_recorded_ones(hand_report, tmp_path):
    report, _ = hand_report
    swapped = write_labels(tmp_path / "swapped.csv", {name: not m for name, m in MEMBERS.items()})
    m = compute_evaluation(report, swapped, EvalConfig(n_values=(1,), draws=1))
    assert m["labels"] == {"file": str(swapped), "source": "given", "has_occurrences": False}
    assert m["full"]["AUC"] == approx(1 - 0.875)  # members and non-members swapped


def test_undefined_rates_are_null(tmp_path):
    labels = write_labels(tmp_path / "labels.csv", {"Anna": True, "Bob": True})  # no non-member
    report = write_report(tmp_path / "report", HAND_IMAGES, CANDIDATES, labels)
    result = evaluate_report(report, labels, SMALL)
    m = no_nan_json(result.out_dir / "metrics.json")
    assert m["full"]["FPR"] is None and m["full"]["AUC"] is None and m["full"]["TPR_at_FPR"]["0"] is None
    assert by_n(m, 3)["FPR"] == {"mean": None, "std": None}
    assert by_n(m, 3)["TPR"]["mean"] == approx(1)
    assert m["counts"]["unlabelled_persons"] == 2 and m["left_out"]["unlabelled_persons"] == ["Carl", "Dora"]
    rows = read_csv(result.out_dir / "rates_by_n.csv")
    assert rows[0]["FPR_mean"] == "" and rows[0]["TPR_mean"] == "1"


def test_a_name_that_is_not_a_candidate_never_hits(tmp_path):
    images = dict(HAND_IMAGES)
    images["z0"] = ("Zed", [0, 0, 0])
    images["z1"] = ("Zed", [0, 0, 0])
    labels = write_labels(tmp_path / "labels.csv", {**MEMBERS, "Zed": True})
    report = write_report(tmp_path / "report", images, CANDIDATES, labels)
    m = compute_evaluation(report, labels, SMALL)
    assert m["left_out"]["not_in_candidates"] == ["Zed"]
    assert m["full"]["TP"] == 2 and m["full"]["FN"] == 1  # Zed is a member scored 0
    assert NOT_A_CANDIDATE < 0


# ----------------------------------------------------------------------------------------------------
# Scores: AUC with ties, TPR at low FPR
# ----------------------------------------------------------------------------------------------------

def trapezoid_auc(scores, members, n_templates):
    tp, fp = threshold_counts(scores, members, n_templates)
    tpr, fpr = tp[::-1] / members.sum(), fp[::-1] / (~members).sum()
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))


def pairwise_auc(scores, members):
    pos, neg = scores[members], scores[~members]
    return float(np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg]))


def test_auc_ties_hand_values():
    assert roc_auc(np.array([2, 1, 1, 0]), np.array([True, True, False, False])) == approx(0.875)
    assert roc_auc(np.array([3, 3, 3]), np.array([True, False, True])) == approx(0.5)
    assert roc_auc(np.array([0, 5]), np.array([True, False])) == approx(0.0)
    assert np.isnan(roc_auc(np.array([1, 2]), np.array([True, True])))


def test_auc_equals_trapezoid_and_pairwise_oracle():
    rng = np.random.default_rng(3)
    for _ in range(30):
        scores = rng.integers(0, 6, size=25)  # many ties
        members = rng.random(25) < 0.4
        if members.all() or not members.any():
            continue
        auc = roc_auc(scores, members)
        assert auc == approx(trapezoid_auc(scores, members, 5))
        assert auc == approx(pairwise_auc(scores, members))


def test_threshold_counts_hand_values():
    tp, fp = threshold_counts(np.array([2, 1, 1, 0]), np.array([True, True, False, False]), 3)
    assert tp.tolist() == [2, 2, 1, 0, 0] and fp.tolist() == [2, 1, 0, 0, 0]


def test_best_tpr_at_fpr_boundaries():
    fpr = np.array([1.0, 0.5, 0.01, 0.0])
    tpr = np.array([1.0, 0.9, 0.7, 0.2])
    assert best_tpr_at_fpr(tpr, fpr, 0.01) == 0.7  # FPR exactly at the target counts
    assert best_tpr_at_fpr(tpr, fpr, 0.009) == 0.2
    assert best_tpr_at_fpr(tpr, fpr, 0.0) == 0.2
    assert best_tpr_at_fpr(tpr, np.array([1 / 100, 0.0, 0.0, 0.0]), 0.01) == 1.0  # 1/100 <= 0.01 exactly


# ----------------------------------------------------------------------------------------------------
# Draws
# ----------------------------------------------------------------------------------------------------

def chosen_by_person(names, person_of_image, mask):
    out = {}
    position = Counter()
    for p, keep in zip(person_of_image, mask):
        if keep:
            out.setdefault(names[p], []).append(position[p])
        position[p] += 1
    return out


def test_draws_take_n_distinct_images_of_each_person_with_enough():
    names = ["A", "B", "C"]
    person_of_image = np.array([0, 1, 0, 2, 1, 0, 1, 0, 2, 1, 1])  # A: 4, B: 5, C: 2 images
    draws = ImageDraws(person_of_image, names, seed=1)
    for n in (1, 2, 3, 4, 5, 6):
        for d in range(5):
            got = chosen_by_person(names, person_of_image, draws.select(n, d))
            for p, name in enumerate(names):
                have = int((person_of_image == p).sum())
                assert len(got.get(name, [])) == (n if have >= n else 0)


def test_draws_are_deterministic_and_depend_on_seed_and_draw():
    names = [f"P{i}" for i in range(6)]
    person_of_image = np.repeat(np.arange(6), 10)
    a, b, c = ImageDraws(person_of_image, names, 5), ImageDraws(person_of_image, names, 5), ImageDraws(
        person_of_image, names, 6)
    assert np.array_equal(a.select(3, 0), b.select(3, 0))
    assert not np.array_equal(a.select(3, 0), c.select(3, 0))
    assert not np.array_equal(a.select(3, 0), a.select(3, 1))
    assert not np.array_equal(a.select(3, 2), a.select(3, 3))


def test_a_persons_draw_does_not_depend_on_other_people():
    names = ["Anna", "Bob"]
    person_of_image = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    before = ImageDraws(person_of_image, names, 0)
    # Add a person whose images come first (every row index shifts) and who sorts before everyone.
    names2 = ["Aaron", "Anna", "Bob"]
    person_of_image2 = np.r_[[0, 0, 0, 0], person_of_image + 1]
    after = ImageDraws(person_of_image2, names2, 0)
    for n in (1, 2, 3):
        for d in range(10):
            old = chosen_by_person(names, person_of_image, before.select(n, d))
            new = chosen_by_person(names2, person_of_image2, after.select(n, d))
            assert new["Anna"] == old["Anna"] and new["Bob"] == old["Bob"]


def test_draws_are_uniform_over_subsets():
    draws = ImageDraws(np.zeros(4, np.int64), ["Solo"], seed=11)
    counts = Counter(tuple(np.flatnonzero(draws.select(2, d))) for d in range(1200))
    assert len(counts) == 6  # every 2-subset of 4 images occurs
    assert all(140 <= c <= 260 for c in counts.values()), counts  # expected 200 each; ~4.5 sigma band


# ----------------------------------------------------------------------------------------------------
# Brute-force oracle over a random report
# ----------------------------------------------------------------------------------------------------

def oracle_score(preds_of_images, true_id, n_templates):
    score = 0
    for t in range(n_templates):
        counts = Counter(p[t] for p in preds_of_images)
        top = max(counts.values())
        winners = [k for k, c in counts.items() if c == top]
        score += len(winners) == 1 and winners[0] == true_id
    return score


def test_engine_matches_a_loop_oracle_on_a_random_report(tmp_path):
    rng = np.random.default_rng(0)
    n_templates, names = 4, [f"Person {i}" for i in range(10)]
    candidates = names + ["Fake A", "Fake B"]
    images = {}
    for p, name in enumerate(names):
        strength = 0.2 + 0.07 * p  # structured: later people are predicted correctly more often
        for j in range(int(rng.integers(3, 8))):
            ids = [p if rng.random() < strength else int(rng.integers(0, len(candidates))) for _ in range(n_templates)]
            images[f"{p}-{j}"] = (name, ids)
    members = {name: bool(i % 2) for i, name in enumerate(names)}
    labels = write_labels(tmp_path / "labels.csv", members)
    report = write_report(tmp_path / "report", images, candidates, labels)
    config = EvalConfig(n_values=(1, 2, 4, 6), draws=6, seed=3, tau=2)
    m = compute_evaluation(report, labels, config)

    person_of_image = np.array([names.index(p) for p, _ in images.values()])
    preds = [ids for _, ids in images.values()]
    draws = ImageDraws(person_of_image, names, config.seed)
    for n in config.n_values:
        tprs, fprs = [], []
        for d in range(config.draws):
            mask = draws.select(n, d)
            tp = fp = pos = neg = 0
            for p, name in enumerate(names):
                chosen = [preds[i] for i in np.flatnonzero(mask & (person_of_image == p))]
                if not chosen:
                    continue
                member = oracle_score(chosen, p, n_templates) >= config.tau
                pos, neg = pos + members[name], neg + (not members[name])
                tp, fp = tp + (member and members[name]), fp + (member and not members[name])
            tprs.append(tp / pos if pos else None)
            fprs.append(fp / neg if neg else None)
        e = by_n(m, n)
        if tprs[0] is None:
            assert e["TPR"]["mean"] is None
        else:
            assert e["TPR"] == {"mean": approx(statistics.fmean(tprs)), "std": approx(statistics.pstdev(tprs))}
        if fprs[0] is not None:
            assert e["FPR"] == {"mean": approx(statistics.fmean(fprs)), "std": approx(statistics.pstdev(fprs))}
    full_scores = np.array([oracle_score([preds[i] for i in np.flatnonzero(person_of_image == p)], p, n_templates)
                            for p in range(len(names))])
    assert m["full"]["AUC"] == approx(pairwise_auc(full_scores, np.array([members[n] for n in names])))


# ----------------------------------------------------------------------------------------------------
# Occurrences
# ----------------------------------------------------------------------------------------------------

def test_occurrence_bins_distinct_values():
    bins = occurrence_bins(np.array([100, 5, 5, -1, 100]), max_bins=12)
    assert bins.kind == "distinct values" and bins.labels == ["5", "100"]
    assert bins.assign(np.array([5, 100, -1, 7])).tolist() == [0, 1, -1, 0]


def test_occurrence_bins_quantiles():
    bins = occurrence_bins(np.arange(1, 21), max_bins=4)
    # np.quantile(method="lower") at 0, 1/4, 1/2, 3/4 of 1..20: positions 0, 4, 9, 14 -> 1, 5, 10, 15
    assert bins.kind == "quantiles" and bins.labels == ["1-4", "5-9", "10-14", "15-20"]
    skewed = np.r_[np.zeros(30, np.int64), np.arange(1, 40)]
    bins = occurrence_bins(skewed, max_bins=5)
    assigned = bins.assign(skewed)
    assert len(bins.lows) <= 5 and (assigned >= 0).all()
    assert sorted(set(assigned.tolist())) == list(range(len(bins.lows)))  # no empty bin
    assert occurrence_bins(np.array([-1, -1]), 3) is None


def test_occurrence_tpr_per_bin(tmp_path):
    labels = write_labels(tmp_path / "labels.csv", MEMBERS, {"Anna": "100", "Bob": "5", "Carl": "0"})
    report = write_report(tmp_path / "report", HAND_IMAGES, CANDIDATES, labels)
    m = compute_evaluation(report, labels, EvalConfig(n_values=(1, 3), draws=4, tau=2))
    occ = m["occurrences"]
    assert occ["binning"] == "distinct values"
    assert [(b["label"], b["members"]) for b in occ["bins"]] == [("5", 1), ("100", 1)]  # members only
    assert occ["full"]["TPR"] == [0.0, 1.0]  # tau 2: Bob (5) scores 1, Anna (100) scores 2
    n3 = next(e for e in occ["by_n"] if e["n"] == 3)
    assert n3["TPR"] == [{"mean": 0.0, "std": 0.0}, {"mean": 1.0, "std": 0.0}] and n3["members"] == [1, 1]


def test_members_without_occurrences_are_counted(tmp_path):
    labels = write_labels(tmp_path / "labels.csv", MEMBERS, {"Anna": "7"})
    report = write_report(tmp_path / "report", HAND_IMAGES, CANDIDATES, labels)
    m = compute_evaluation(report, labels, SMALL)
    assert m["left_out"]["members_without_occurrences"] == ["Bob"]
    assert [b["label"] for b in m["occurrences"]["bins"]] == ["7"]


def test_read_label_table_occurrences(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("name,member,occurrences\nAnna,1,75\nBob,0,\nCarl,yes, 3 \n", encoding="utf-8")
    table = read_label_table(f)
    assert table.members == {"Anna": True, "Bob": False, "Carl": True} == read_labels(f)
    assert table.occurrences == {"Anna": 75, "Carl": 3} and table.has_occurrences_column
    plain = tmp_path / "plain.csv"
    plain.write_text("name,member\nAnna,1\n", encoding="utf-8")
    assert read_label_table(plain).occurrences == {} and not read_label_table(plain).has_occurrences_column


@pytest.mark.parametrize("value", ["-1", "2.5", "many", "1e3"])
def test_bad_occurrences_value_names_file_line_and_value(tmp_path, value):
    f = tmp_path / "labels.csv"
    f.write_text(f"name,member,occurrences\nAnna,1,4\nBob,1,{value}\n", encoding="utf-8")
    message = one_line_error(InputError, read_label_table, f)
    assert f"{f}:3" in message and repr(value) in message and "occurrences" in message


# ----------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------

def test_outputs_and_summary(tmp_path):
    labels = write_labels(tmp_path / "labels.csv", MEMBERS, {"Anna": "100", "Bob": "5"})
    report = write_report(tmp_path / "report", HAND_IMAGES, CANDIDATES, labels)
    before = json.loads((report / "summary.json").read_text(encoding="utf-8"))
    calls = []
    result = evaluate_report(report, labels, SMALL, progress=lambda *a: calls.append(a))
    out = report / "evaluation"
    assert result.out_dir == out
    pngs = ["rates_by_n.png", "roc.png", "roc_loglog.png", "scores_roc.png", "occurrence_heatmap.png"]
    csvs = ["rates_by_n.csv", "tau_sweep.csv", "roc.csv", "occurrence_tpr.csv", "scores.csv", "scores_roc.csv",
            "person_scores.csv"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 2000, name
    for name in csvs:
        assert len((out / name).read_text(encoding="utf-8").splitlines()) > 1, name
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "0.875" in page and "Rates per n images" in page and "<script" not in page
    metrics = no_nan_json(out / "metrics.json")
    assert metrics["schema_version"] == 1 and metrics["config"]["n_values"] == [1, 3]
    assert set(metrics["files"]) == set(pngs + csvs + ["report.html", "metrics.json"])
    assert sorted(p.name for p in result.files) == sorted(metrics["files"])

    after = json.loads((report / "summary.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in after.items() if k != "evaluation"} == before
    ev = after["evaluation"]
    assert ev["dir"] == "evaluation" and ev["metrics"] == "evaluation/metrics.json"
    assert sorted(ev["files"]) == sorted(f"evaluation/{name}" for name in metrics["files"])
    assert all((report / f).is_file() for f in ev["files"])
    assert calls[-1] == ("write evaluation", 1, 1)
    draw_calls = [c for c in calls if c[0] == "evaluate draws"]
    assert draw_calls[-1][1] == draw_calls[-1][2] == 2 * SMALL.draws

    rows = read_csv(out / "rates_by_n.csv")
    assert [r["n"] for r in rows] == ["1", "3"] and rows[1]["accuracy_mean"] == "0.666667"
    roc = [r for r in read_csv(out / "roc.csv") if r["curve"] == "full report"]
    assert [(r["threshold"], r["FPR_mean"], r["TPR_mean"]) for r in roc] == [
        ("4", "0", "0"), ("3", "0", "0"), ("2", "0", "0.5"), ("1", "0.5", "1"), ("0", "1", "1")]

    evaluate_report(report, labels, SMALL)  # a second run replaces the earlier evaluation
    assert (out / "metrics.json").is_file() and not any(p.name.startswith(".") for p in report.iterdir())


def test_no_occurrences_no_heatmap(hand_report, tmp_path):
    report, labels = hand_report
    out = tmp_path / "elsewhere"
    result = evaluate_report(report, labels, EvalConfig(n_values=(1,), draws=2, out_dir=out))
    assert result.out_dir == out and not (out / "occurrence_heatmap.png").exists()
    assert result.metrics["occurrences"] is None
    summary = json.loads((report / "summary.json").read_text(encoding="utf-8"))
    assert summary["evaluation"]["dir"] == str(out.resolve())


def test_paper_n_values():
    assert PAPER_N_VALUES == (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 30)
    assert EvalConfig().n_values == PAPER_N_VALUES and EvalConfig().draws == 20 and EvalConfig().tau == 1


# ----------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------

def one_line_error(kind, fn, *args, **kwargs) -> str:
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert isinstance(info.value, IdiaError)
    return message


def test_not_a_report(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in one_line_error(ArtifactError, evaluate_report, empty, None)
    assert "not a directory" in one_line_error(ArtifactError, evaluate_report, tmp_path / "missing", None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text('{"artifact": "something else"}', encoding="utf-8")
    assert "something else" in one_line_error(ArtifactError, evaluate_report, other, None)


def test_missing_labels(tmp_path):
    report = write_report(tmp_path / "report", HAND_IMAGES, CANDIDATES, labels_file=None)
    assert "labels" in one_line_error(InputError, evaluate_report, report, None)
    gone = write_report(tmp_path / "report2", HAND_IMAGES, CANDIDATES, labels_file=tmp_path / "gone.csv")
    assert str(tmp_path / "gone.csv") in one_line_error(InputError, evaluate_report, gone, None)


def test_labels_that_name_nobody_of_the_report(tmp_path):
    labels = write_labels(tmp_path / "labels.csv", {"Someone Else": True})
    report = write_report(tmp_path / "report", HAND_IMAGES, CANDIDATES, labels)
    assert str(labels) in one_line_error(InputError, evaluate_report, report, labels)


@pytest.mark.parametrize("options, must_name", [
    (dict(n_values=()), "empty"),
    (dict(n_values=(1, 0)), "0"),
    (dict(n_values=(-3,)), "-3"),
    (dict(draws=0), "draws"),
    (dict(tau=0), "1..3"),
    (dict(tau=4), "1..3"),
    (dict(seed=-1), "seed"),
    (dict(low_fpr_targets=(1.5,)), "1.5"),
])
def test_bad_options(hand_report, options, must_name):
    report, labels = hand_report
    # The config checks itself when made (tau, whose range depends on the report, when the report is read).
    assert must_name in one_line_error(InputError, lambda: evaluate_report(report, labels, EvalConfig(**options)))
    assert not (report / "evaluation").exists()


def test_refuses_to_replace_a_folder_that_is_not_an_evaluation(hand_report, tmp_path):
    report, labels = hand_report
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me", encoding="utf-8")
    one_line_error(ArtifactExistsError, evaluate_report, report, labels, EvalConfig(draws=1, out_dir=precious))
    assert (precious / "thesis.tex").read_text(encoding="utf-8") == "keep me"


# ----------------------------------------------------------------------------------------------------
# Intervals over people and the scores beside paper mode
# ----------------------------------------------------------------------------------------------------

def test_full_report_rates_carry_clopper_pearson_intervals(hand_metrics):
    from scipy import stats
    intervals = hand_metrics["full"]["intervals"]
    for key, (k, n) in {"TPR": (2, 2), "FPR": (1, 2), "TNR": (1, 2), "accuracy": (3, 4)}.items():
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        assert (intervals[key]["k"], intervals[key]["n"]) == (k, n)
        assert intervals[key]["low"] == approx(ci.low) and intervals[key]["high"] == approx(ci.high)
    row = by_n(hand_metrics, 3)  # every draw is all images: the interval is that of the counts
    assert row["intervals"]["FPR"]["n"] == 1 and row["intervals"]["FPR"]["low"] == approx(0.025)
    assert any("1 of 2 non-members: FPR = 50 %" in note for note in hand_metrics["notes"])
    assert any("cannot be backed by 2 non-members" in note for note in hand_metrics["notes"])


def test_scores_side_by_side(hand_metrics):
    scores = hand_metrics["scores"]
    assert list(scores["full"]) == ["paper", "vote_share", "margin", "calibrated"]
    assert all("not the paper's" in scores["definitions"][s] for s in ("vote_share", "margin", "calibrated"))
    paper = scores["full"]["paper"]
    assert paper["AUC"]["value"] == approx(0.875) and paper["AUC"]["low"] <= 0.875 <= paper["AUC"]["high"]
    assert paper["TPR_at_FPR"]["0"]["value"] == approx(0.5)
    # vote shares: Anna 6/9, Bob 3/9 | Carl 2/9, Dora 0/6: members above non-members, AUC 1
    assert scores["full"]["vote_share"]["AUC"]["value"] == approx(1.0)
    assert scores["headline"]["n"] == 3 and scores["headline"]["paper"]["AUC"]["mean"] == approx(0.75)
    assert scores["best_at_lowest_fpr"]["FPR"] == 0.5  # 2 non-members resolve no low target


def test_person_scores_file(hand_report):
    report, labels = hand_report
    evaluate_report(report, labels, SMALL)
    rows = {r["name"]: r for r in read_csv(report / "evaluation" / "person_scores.csv")}
    assert set(rows) == {"Anna", "Bob", "Carl", "Dora"}
    assert rows["Anna"]["paper"] == "2" and float(rows["Anna"]["vote_share"]) == pytest.approx(6 / 9, abs=1e-8)
    assert rows["Dora"]["member"] == "0" and float(rows["Dora"]["vote_share"]) == 0
    # Carl's name (id 2) is top-1 for Anna's a2/t2 and Bob's b1/t0 among the 8 other people's 24 pairs
    assert float(rows["Carl"]["reference_share"]) == pytest.approx(2 / 24, abs=1e-8)
    page = (report / "evaluation" / "report.html").read_text(encoding="utf-8")
    assert "Scores side by side" in page and "Clopper-Pearson" in page


class _Page(HTMLParser):
    """Per <details> block: its summary text and the rows (cell texts) of its tables; and the model card."""

    def __init__(self):
        super().__init__()
        self.persons, self.card, self._cell, self._row, self._where = [], [], None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details":
            self.persons.append({"summary": "", "rows": []})
            self._where = "details"
        elif tag == "table" and attrs.get("class") == "card":
            self._where = "card"
        elif tag == "summary":
            self._cell = ""
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "summary":
            self.persons[-1]["summary"], self._cell = self._cell, None
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._where == "details":
                self.persons[-1]["rows"].append(self._row)
            elif self._where == "card":
                self.card.append(self._row)
            self._row = None
        elif tag in ("details", "table") and self._where == "card":
            self._where = None


def _parsed_page(report: Path) -> _Page:
    page = _Page()
    page.feed((report / "evaluation" / "report.html").read_text(encoding="utf-8"))
    return page


def test_the_page_has_a_model_card_and_a_drill_down_per_person(hand_report):
    report, labels = hand_report
    evaluate_report(report, labels, SMALL)
    page = _parsed_page(report)
    card = dict(page.card)
    assert {"model (architecture)", "weights fingerprint (SHA-256)", "candidate names", "name index", "exactness",
            "library versions", "command line"} <= set(card)
    assert card["candidate names"].startswith("5 ")
    anna = next(p for p in page.persons if p["summary"].startswith("Anna"))
    assert anna["summary"] == "Anna: score 2 of 3, decided member, labelled member"
    # templates: t0 {Anna: 3} hit; t1 {Anna: 2, Bob: 1} hit; t2 a three-way tie
    templates = [r for r in anna["rows"] if len(r) == 6 and r[0] in ("0", "1", "2")]
    assert [r[2:] for r in templates] == [["Anna", "3", "3", "hit"], ["Anna", "2", "2", "hit"], ["tie", "1", "1", ""]]
    photos = [r for r in anna["rows"] if len(r) == 3 and r[0].startswith("/faces/")]
    assert [r[:2] for r in photos] == [["/faces/Anna/a0.jpg", "3"], ["/faces/Anna/a1.jpg", "2"],
                                       ["/faces/Anna/a2.jpg", "1"]]
    assert photos[1][2] == "Anna ×2 (0.900); Bob ×1 (0.900)"


def test_redact_leaves_out_photo_paths_and_other_peoples_names(hand_report, tmp_path):
    report, labels = hand_report
    evaluate_report(report, labels, EvalConfig(n_values=(1, 3), draws=2, redact=True))
    text = (report / "evaluation" / "report.html").read_text(encoding="utf-8")
    assert "/faces/" not in text and str(report) not in text and str(labels) not in text
    page = _parsed_page(report)
    anna = next(p for p in page.persons if p["summary"].startswith("Anna"))
    cells = " ".join(c for row in anna["rows"] for c in row)
    assert not any(other in cells for other in ("Bob", "Carl", "Dora", "Fake One"))
    assert "another name (1)" in cells and "photo 1 · sha256 sha-a0" in cells
    metrics = json.loads((report / "evaluation" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["report"]["dir"] == "report" and metrics["labels"]["file"] == "labels.csv"
    assert "/faces/" not in (report / "evaluation" / "person_scores.csv").read_text(encoding="utf-8")


def test_a_users_file_in_an_earlier_evaluation_is_never_deleted(hand_report):
    report, labels = hand_report
    config = EvalConfig(n_values=(1,), draws=2)
    evaluate_report(report, labels, config)
    (report / "evaluation" / "plots").mkdir()
    (report / "evaluation" / "plots" / "mine.png").write_bytes(b"mine")
    with pytest.raises(InputError, match=r"holds plots/mine\.png, which no evaluation writes"):
        evaluate_report(report, labels, config)
    assert (report / "evaluation" / "plots" / "mine.png").read_bytes() == b"mine"


def test_one_member_and_one_non_member_evaluate_without_intervals_they_cannot_have(tmp_path):
    images = {k: v for k, v in HAND_IMAGES.items() if v[0] in ("Anna", "Carl")}
    labels = write_labels(tmp_path / "labels.csv", {"Anna": True, "Carl": False})
    metrics = evaluate_report(write_report(tmp_path / "report", images, CANDIDATES, labels), None, SMALL).metrics
    paper = metrics["scores"]["full"]["paper"]
    assert paper["AUC"]["value"] == approx(1.0) and paper["AUC"]["low"] is None
    assert metrics["full"]["intervals"]["TPR"]["n"] == 1
