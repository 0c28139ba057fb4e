"""`evaluate`: the paper's evaluation protocol over a cached attack report, plus membership-inference scores.

Why from the report: `query` stores every image's top-k candidates per template, so any subset of a
person's images can be voted again with array work alone (no re-encoding, no re-search).

What (IDIA.md point 8, and "Where the engine goes beyond the paper"):
- n images per person swept over 1, 3, ..., 29, 30; per n, `draws` seeded draws of n images per person
  without replacement; per draw TP/FN/FP/TN over the labelled people at tau; mean +- std over draws of
  TPR, FNR, FPR, TNR and accuracy. People with fewer than n usable images are left out at that n (counted).
- The paper-mode score 0..T (templates whose unique plurality is the true name; higher = more likely a
  member) used as a membership score: TPR/FPR per tau, ROC, AUC (ties count 1/2), and the best TPR at
  FPR <= 1 %, 0.1 % and 0 %; at the headline n per draw (mean +- std) and for the full report (every
  usable image of every person).
- With an `occurrences` column in the labels: members' TPR per occurrence bin, per n.

Conventions: std is the population std over draws (ddof = 0, numpy's default). A rate whose denominator
is 0 is None (JSON null), never NaN. Draws are reproducible: a person's draw depends only on
(seed, n, draw index, name), so adding or removing people never changes anyone else's draw.

The output folder (default <report>/evaluation/) is staged and swapped in atomically; eval_report.py
renders its CSVs, plots and HTML from the metrics computed here. Afterwards the report's summary.json
lists the evaluation's files under "evaluation".

metrics.json: schema_version, artifact, created_at; report (dir, model, templates T, candidates); config;
labels (file, source, has_occurrences); counts and left_out (who is not evaluated, and why); notes;
headline (the n = 30 row of by_n plus n_requested, tau_sweep and roc, each number {"mean", "std"});
full (the same numbers as single values, from all images); by_n (one row per n: persons, members,
non_members, left_out*, draws, TP..TN, TPR, FNR, FPR, TNR, accuracy, AUC, TPR_at_FPR {"0.01", "0.001",
"0"}); occurrences (binning, bins, by_n, full; null without an occurrences column); files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..disk.atomic import staged_directory, write_json_atomic
from ..disk.textfiles import read_artifact_json
from ..disk.versions import library_versions, utc_now
from ..errors import ArtifactError, ArtifactExistsError, InputError
from ..progress import Progress, no_progress
from ..query.labels import LabelTable, read_label_table
from ..query.report import (
    PREDICTIONS,
    REPORT_ARTIFACT,
    REPORT_SCHEMA_VERSION,
    SUMMARY,
    Predictions,
    load_predictions,
)
from ..query.votes import paper_mode_votes
from .render import write_evaluation_files

log = logging.getLogger(__name__)

PAPER_N_VALUES = (*range(1, 30, 2), 30)  # 1, 3, 5, ..., 29, 30 (IDIA.md point 8)
EVAL_SCHEMA_VERSION = 1
EVAL_ARTIFACT = "idia-engine evaluation"
DEFAULT_EVAL_DIR = "evaluation"
METRICS_FILE = "metrics.json"
NOT_A_CANDIDATE = -2  # true id of a person whose name is not a candidate: never predicted, so never a hit
COUNT_KEYS = ("TP", "FN", "FP", "TN")
RATE_KEYS = ("TPR", "FNR", "FPR", "TNR", "accuracy")


@dataclass(frozen=True)
class EvalConfig:
    """Everything `evaluate_report` needs besides the report and the labels."""

    n_values: tuple[int, ...] = PAPER_N_VALUES  # images per person to sweep; each n gets `draws` draws
    draws: int = 20  # random draws of n images per person (without replacement), per n
    seed: int = 0  # seeds the draws (>= 0); a person's draw depends only on (seed, n, draw, name)
    tau: int = 1  # member iff score >= tau, 1..T (the paper's tau = 1)
    headline_n: int = 30  # n of the headline numbers; the largest n of the sweep with people if nobody has it
    low_fpr_targets: tuple[float, ...] = (0.01, 0.001, 0.0)  # report the best TPR at FPR <= each
    max_occurrence_bins: int = 12  # one bin per distinct occurrence count up to this many, else quantile bins
    out_dir: Path | None = None  # the evaluation folder; None = <report_dir>/evaluation


@dataclass(frozen=True)
class EvalResult:
    out_dir: Path  # the evaluation folder
    metrics: dict  # what metrics.json holds
    files: list[Path] = field(default_factory=list)  # every file written, metrics.json included


# ----------------------------------------------------------------------------------------------------
# Inputs: the report, the labels, and the people the metrics are over
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Population:
    """The labelled people of a report who have at least one usable image (L people, M of their images)."""

    names: list[str]  # [L], in report order
    members: np.ndarray  # bool [L]: ground truth
    occurrences: np.ndarray  # int64 [L]: training-data occurrences from the labels, -1 where unknown
    true_ids: np.ndarray  # int64 [L]: candidate id of the true name, NOT_A_CANDIDATE if not a candidate
    top1: np.ndarray  # int64 [M, T]: predicted candidate id per image and template
    person_of_image: np.ndarray  # int64 [M]: 0..L-1

    @property
    def n_templates(self) -> int:
        return self.top1.shape[1]

    @property
    def images_per_person(self) -> np.ndarray:
        """int64 [L]: usable images of each person."""
        return np.bincount(self.person_of_image, minlength=len(self.names)).astype(np.int64)


def open_report(report_dir: Path) -> tuple[dict, Predictions]:
    """(summary.json content, predictions) of a report written by `query`; ArtifactError if it is not one."""
    report_dir = Path(report_dir)
    hint = "give the output folder of `idia-engine query`"
    if not report_dir.is_dir():
        raise ArtifactError(f"report {report_dir} is not a directory; {hint}")
    summary = read_artifact_json(report_dir / SUMMARY, REPORT_ARTIFACT, REPORT_SCHEMA_VERSION,
                                 f"run `query` again or {hint}")
    for name in ("topk_ids.npy", "images.csv", "candidates.txt"):
        if not (report_dir / PREDICTIONS / name).is_file():
            raise ArtifactError(f"report {report_dir} lacks {PREDICTIONS}/{name}; run `query` again")
    preds = load_predictions(report_dir)
    ids = preds.topk_ids
    if ids.ndim != 3 or ids.shape[1] < 1 or ids.shape[2] < 1 or ids.shape[0] != len(preds.images):
        raise ArtifactError(f"{report_dir / PREDICTIONS / 'topk_ids.npy'} has shape {ids.shape}; expected "
                            f"[images = {len(preds.images)} rows of images.csv, templates >= 1, k >= 1]")
    return summary, preds


def resolve_labels_path(report_dir: Path, summary: dict, labels_path: Path | None) -> tuple[Path, str]:
    """(labels file, where it came from): the one given, else the one recorded in summary.json."""
    if labels_path is not None:
        return Path(labels_path), "given"
    recorded = (summary.get("parameters") or {}).get("labels_file")
    summary_path = Path(report_dir) / SUMMARY
    if not recorded:
        raise InputError(f"no labels: {summary_path} records no labels file and none was given; metrics need "
                         "ground truth, so pass a CSV with columns name,member[,occurrences]")
    if not Path(recorded).is_file():
        raise InputError(f"labels file {recorded} recorded in {summary_path} does not exist (any more); "
                         "pass the labels CSV explicitly")
    return Path(recorded), f"recorded in {SUMMARY}"


@dataclass(frozen=True)
class Coverage:
    """Who of the report and the labels is evaluated, and who is not and why."""

    persons_with_images: int  # people of the report with at least one usable image
    persons_without_images: int  # people of the report none of whose images was usable
    left_out: dict[str, list[str]]  # reason -> names (see LEFT_OUT_REASONS)


LEFT_OUT_REASONS = {
    "unlabelled_persons": "people with images but no label are not evaluated",
    "labelled_without_images": "labelled people without a usable image are not evaluated",
    "labels_for_unknown_names": "labels name people who are not in the report",
    "not_in_candidates": "labelled people whose name is not a candidate can never be hit",
    "members_without_occurrences": "members without an occurrence count are left out of the occurrence bins",
}


def build_population(preds: Predictions, labels: LabelTable, summary: dict,
                     labels_path: Path) -> tuple[Population, Coverage]:
    """The labelled people with images, and who was left out and why."""
    image_names = [row["name"] for row in preds.images]
    persons = list(dict.fromkeys(image_names))
    labelled = [p for p in persons if p in labels.members]
    if not labelled:
        example = f" (e.g. {persons[0]!r})" if persons else ""
        raise InputError(f"labels file {labels_path} labels none of the {len(persons)} people with images in the "
                         f"report{example}; the names must match the report's person names")
    local = {name: i for i, name in enumerate(labelled)}
    rows = np.array([i for i, name in enumerate(image_names) if name in local], np.int64)
    person_of_image = np.array([local[image_names[i]] for i in rows], np.int64)
    top1 = np.asarray(preds.topk_ids[:, :, 0], dtype=np.int64)[rows]

    true_ids = np.full(len(labelled), NOT_A_CANDIDATE, np.int64)
    for cand_id, cand in enumerate(preds.candidates):
        i = local.get(cand)
        if i is not None and true_ids[i] == NOT_A_CANDIDATE:
            true_ids[i] = cand_id
    members = np.array([labels.members[p] for p in labelled], bool)
    occurrences = np.array([labels.occurrences.get(p, -1) for p in labelled], np.int64)

    without_images = list(summary.get("persons_without_images") or [])
    known = set(persons) | set(without_images)
    left_out = {
        "unlabelled_persons": [p for p in persons if p not in labels.members],
        "labelled_without_images": [p for p in without_images if p in labels.members],
        "labels_for_unknown_names": sorted(set(labels.members) - known),
        "not_in_candidates": [p for p, t in zip(labelled, true_ids) if t == NOT_A_CANDIDATE],
        "members_without_occurrences": ([p for p, m, o in zip(labelled, members, occurrences) if m and o < 0]
                                        if labels.has_occurrences_column else []),
    }
    return (Population(labelled, members, occurrences, true_ids, top1, person_of_image),
            Coverage(len(persons), len(without_images), left_out))


# ----------------------------------------------------------------------------------------------------
# Draws of n images per person
# ----------------------------------------------------------------------------------------------------

def _mix64(x) -> np.ndarray:
    """splitmix64's output function: a bijective 64-bit mixer (distinct inputs give distinct outputs)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def name_keys(names: list[str]) -> np.ndarray:
    """uint64 [P]: a stable key per name, the first 8 bytes of its UTF-8 SHA-256 (as `query` uses)."""
    return np.array([int.from_bytes(hashlib.sha256(n.encode("utf-8")).digest()[:8], "little") for n in names],
                    dtype=np.uint64)


def _rank_within_group(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """int64 [M]: the position of each element among the elements of its group, ordered by key."""
    order = np.lexsort((key, group))
    sorted_group = group[order]
    start = np.searchsorted(sorted_group, sorted_group, side="left")
    rank = np.empty(len(group), np.int64)
    rank[order] = np.arange(len(group)) - start
    return rank


class ImageDraws:
    """Seeded random draws of n images per person, without replacement.

    Every image gets a 64-bit key hashed from (seed, n, draw index, person name, position of the image
    among the person's images in report order); a draw takes each person's n images with the smallest
    keys. The keys behave as independent uniform numbers, so every n-subset is equally likely, and a
    person's draw depends on nothing else: adding a person changes no one else's images.
    """

    def __init__(self, person_of_image: np.ndarray, names: list[str], seed: int):
        if seed < 0:
            raise InputError(f"seed must be >= 0, got {seed}")
        self.person_of_image = np.asarray(person_of_image, np.int64)
        self.images_per_person = np.bincount(self.person_of_image, minlength=len(names))
        self._position = _rank_within_group(self.person_of_image, np.arange(len(self.person_of_image)))
        self._name_keys = name_keys(names)
        self._seed = seed % 2**64

    def select(self, n: int, draw: int) -> np.ndarray:
        """bool [M]: n images of every person who has at least n; nothing of anyone who has fewer."""
        stream = _mix64(_mix64(_mix64(self._seed) ^ np.uint64(n)) ^ np.uint64(draw))
        person_stream = _mix64(self._name_keys ^ stream)
        keys = _mix64(person_stream[self.person_of_image] ^ self._position.astype(np.uint64))
        rank = _rank_within_group(self.person_of_image, keys)
        return (rank < n) & (self.images_per_person[self.person_of_image] >= n)


# ----------------------------------------------------------------------------------------------------
# Metrics of one set of scores
# ----------------------------------------------------------------------------------------------------

def _ratio(num, den) -> float:
    """num / den, NaN when den is 0 (undefined; becomes None in JSON)."""
    return float(num) / float(den) if den else float("nan")


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
    tpr = np.array([_ratio(x, n_pos) for x in tp])
    fpr = np.array([_ratio(x, n_neg) for x in fp])
    accuracy = np.array([_ratio(t + n_neg - f, n_pos + n_neg) for t, f in zip(tp, fp)])
    t = config.tau
    counts = {"TP": int(tp[t]), "FN": n_pos - int(tp[t]), "FP": int(fp[t]), "TN": n_neg - int(fp[t])}
    rates = {"TPR": tpr[t], "FNR": _ratio(counts["FN"], n_pos), "FPR": fpr[t], "TNR": _ratio(counts["TN"], n_neg),
             "accuracy": accuracy[t]}
    binned = (bin_of >= 0) & members
    hits = np.bincount(bin_of[binned], weights=(scores[binned] >= t).astype(float), minlength=n_bins)
    totals = np.bincount(bin_of[binned], minlength=n_bins)
    occurrence_tpr = np.array([_ratio(h, c) for h, c in zip(hits, totals)])
    return ScoreStats(counts, {k: float(v) for k, v in rates.items()}, tpr, fpr, accuracy,
                      roc_auc(scores, members), tuple(best_tpr_at_fpr(tpr, fpr, x) for x in config.low_fpr_targets),
                      occurrence_tpr)


def paper_scores(pop: Population, selected: np.ndarray | None = None) -> np.ndarray:
    """int64 [L]: paper-mode score of every person from the selected images (all images if None)."""
    if selected is None:
        return paper_mode_votes(pop.top1, pop.person_of_image, pop.true_ids).scores
    return paper_mode_votes(pop.top1[selected], pop.person_of_image[selected], pop.true_ids).scores


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

def _number(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _mean_std(values) -> dict[str, float | None]:
    """Mean and population std (ddof = 0) over draws; None when undefined (no draw or NaN rates)."""
    values = np.asarray(values, float)
    if not len(values) or np.isnan(values).all():
        return {"mean": None, "std": None}
    return {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values))}


def fpr_key(target: float) -> str:
    """The JSON key of a low-FPR target: 0.01 -> "0.01", 0.0 -> "0"."""
    return f"{target:g}"


def _population_counts(pop: Population, eligible: np.ndarray) -> dict[str, int]:
    m = pop.members
    return {"persons": int(eligible.sum()), "members": int((eligible & m).sum()),
            "non_members": int((eligible & ~m).sum()), "left_out": int((~eligible).sum()),
            "left_out_members": int((~eligible & m).sum()), "left_out_non_members": int((~eligible & ~m).sum())}


def summarise_draws(n: int, stats: list[ScoreStats], counts: dict, config: EvalConfig) -> dict:
    """One row of the per-n table: counts of people, then mean +- std over draws of every number."""
    entry = {"n": n, **counts, "draws": len(stats)}
    for key in COUNT_KEYS:
        entry[key] = _mean_std([s.counts[key] for s in stats])
    for key in RATE_KEYS:
        entry[key] = _mean_std([s.rates[key] for s in stats])
    entry["AUC"] = _mean_std([s.auc for s in stats])
    entry["TPR_at_FPR"] = {fpr_key(x): _mean_std([s.tpr_at_fpr[i] for s in stats])
                           for i, x in enumerate(config.low_fpr_targets)}
    return entry


def curves_of_draws(stats: list[ScoreStats], n_templates: int) -> dict:
    """Tau sweep (tau 1..T) and ROC (threshold T+1 .. 0) averaged over draws at each threshold."""
    def at(attr: str, t: int) -> dict:
        return _mean_std([getattr(s, attr)[t] for s in stats])

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
        **{k: _number(v) for k, v in stats.rates.items()},
        "AUC": _number(stats.auc),
        "TPR_at_FPR": {fpr_key(x): _number(v) for x, v in zip(config.low_fpr_targets, stats.tpr_at_fpr)},
        "tau_sweep": [{"tau": t, "TPR": _number(stats.tpr[t]), "FPR": _number(stats.fpr[t]),
                       "accuracy": _number(stats.accuracy[t])} for t in range(1, n_templates + 1)],
        "roc": [{"threshold": t, "FPR": _number(stats.fpr[t]), "TPR": _number(stats.tpr[t])}
                for t in range(n_templates + 1, -1, -1)],
    }


# ----------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------

def validate_config(config: EvalConfig) -> tuple[int, ...]:
    """Check the options that do not depend on the report; return the sorted distinct n values."""
    n_values = tuple(config.n_values)
    if not n_values:
        raise InputError("the list of n (images per person) is empty; give at least one n >= 1, e.g. 1,3,5,30")
    bad = [n for n in n_values if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1]
    if bad:
        raise InputError(f"n (images per person) must be whole numbers >= 1, got {bad[0]!r}")
    checks = [("draws", config.draws, 1), ("headline n", config.headline_n, 1), ("seed", config.seed, 0),
              ("max occurrence bins", config.max_occurrence_bins, 1)]
    for what, value, low in checks:
        if value < low:
            raise InputError(f"{what} must be >= {low}, got {value}")
    for target in config.low_fpr_targets:
        if not 0 <= target < 1:
            raise InputError(f"low-FPR target {target!r} must be in [0, 1)")
    return tuple(sorted({int(n) for n in n_values}))


def choose_headline_n(requested: int, n_values: tuple[int, ...], images: np.ndarray) -> tuple[int | None, str | None]:
    """(headline n, note): the requested n if anyone has that many images, else the largest n of the sweep
    that has people, else None."""
    if (images >= requested).any():
        return requested, None
    with_people = [n for n in n_values if (images >= n).any()]
    if not with_people:
        return None, (f"no labelled person has {requested} or even {min(n_values)} usable images; "
                      "no headline numbers")
    return max(with_people), (f"no labelled person has {requested} usable images; headline numbers use "
                              f"n = {max(with_people)}, the largest n of the sweep that has people")


def _notes(by_n: list[dict], left_out: dict[str, list[str]], headline_note: str | None, full: dict,
           config: EvalConfig) -> list[str]:
    notes = []
    short = [f"n = {e['n']}: {e['left_out']}" for e in by_n if e["left_out"]]
    if short:
        notes.append("people with fewer than n usable images are left out at that n (left out: "
                     + ", ".join(short) + ")")
    if headline_note:
        notes.append(headline_note)
    for key, text in LEFT_OUT_REASONS.items():
        if left_out[key]:
            notes.append(f"{text}: {len(left_out[key])} (e.g. {left_out[key][0]!r})")
    non_members = full["non_members"]
    tiny = [x for x in config.low_fpr_targets if 0 < x and non_members and x < 1 / non_members]
    if tiny:
        notes.append(f"with {non_members} non-members the smallest non-zero FPR is {1 / non_members:.3g}, so TPR at "
                     f"FPR <= {', '.join(fpr_key(x) for x in tiny)} equals TPR at FPR = 0")
    return notes


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything but an earlier evaluation (or an empty directory)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"evaluation output {out_dir} exists and is not a directory")
    try:
        if json.loads((out_dir / METRICS_FILE).read_text(encoding="utf-8")).get("artifact") == EVAL_ARTIFACT:
            return
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass
    if any(out_dir.iterdir()):
        raise ArtifactExistsError(f"evaluation output {out_dir} is not empty and holds no earlier evaluation; "
                                  "choose another output folder")


def _relative_to_report(path: Path, report_dir: Path) -> str:
    """A path as summary.json records it: relative to the report (POSIX) if inside it, else absolute."""
    path, report_dir = path.resolve(), report_dir.resolve()
    return path.relative_to(report_dir).as_posix() if path.is_relative_to(report_dir) else str(path)


def eval_out_dir(report_dir: Path, config: EvalConfig) -> Path:
    """Where the evaluation goes: config.out_dir, else <report_dir>/evaluation."""
    return Path(config.out_dir) if config.out_dir is not None else Path(report_dir) / DEFAULT_EVAL_DIR


def _sweep(pop: Population, n_list: list[int], bin_of: np.ndarray, n_bins: int, config: EvalConfig,
           progress: Progress) -> dict[int, tuple[dict, list[ScoreStats]]]:
    """For each n: (counts of people evaluated and left out, the stats of every draw)."""
    images = pop.images_per_person
    draws = ImageDraws(pop.person_of_image, pop.names, config.seed)
    out: dict[int, tuple[dict, list[ScoreStats]]] = {}
    total, done = len(n_list) * config.draws, 0
    progress("evaluate draws", 0, total)
    for n in n_list:
        eligible = images >= n
        stats = []
        if eligible.any():
            for d in range(config.draws):
                scores = paper_scores(pop, draws.select(n, d))[eligible]
                stats.append(score_stats(scores, pop.members[eligible], bin_of[eligible], n_bins, pop.n_templates,
                                         config))
                done += 1
                progress("evaluate draws", done, total)
        else:  # nobody has n images: no draws to make
            done += config.draws
            progress("evaluate draws", done, total)
        out[n] = (_population_counts(pop, eligible), stats)
    return out


def _occurrence_section(bins: OccurrenceBins, bin_of: np.ndarray, pop: Population,
                        per_n: dict[int, tuple[dict, list[ScoreStats]]], n_values: tuple[int, ...],
                        full_stats: ScoreStats) -> dict:
    """Members' TPR at tau per occurrence bin: per n (mean +- std over draws) and for the full report."""
    members_in = [(bin_of == b) & pop.members for b in range(len(bins.lows))]
    images = pop.images_per_person
    return {
        "binning": bins.kind,
        "bins": [{"label": label, "low": int(lo), "high": int(hi), "members": int(m.sum())}
                 for label, lo, hi, m in zip(bins.labels, bins.lows, bins.highs, members_in)],
        "by_n": [{"n": n, "members": [int((m & (images >= n)).sum()) for m in members_in],
                  "TPR": [_mean_std([s.occurrence_tpr[b] for s in per_n[n][1]]) for b in range(len(members_in))]}
                 for n in n_values],
        "full": {"TPR": [_number(x) for x in full_stats.occurrence_tpr]},
    }


def compute_evaluation(report_dir: Path, labels_path: Path | None = None, config: EvalConfig = EvalConfig(),
                       progress: Progress = no_progress) -> dict:
    """Every number of the evaluation (what metrics.json holds, less its "files"), writing nothing.

    labels_path: CSV name,member[,occurrences]; None = the labels file recorded in the report's summary.json.
    """
    report_dir = Path(report_dir)
    n_values = validate_config(config)
    summary, preds = open_report(report_dir)
    n_templates = preds.topk_ids.shape[1]
    if not 1 <= config.tau <= n_templates:
        raise InputError(f"tau {config.tau} is out of range; the report has {n_templates} templates, so use "
                         f"1..{n_templates} (member iff score >= tau)")
    labels_path, labels_source = resolve_labels_path(report_dir, summary, labels_path)
    labels = read_label_table(labels_path)
    pop, coverage = build_population(preds, labels, summary, labels_path)
    bins = occurrence_bins(np.where(pop.members, pop.occurrences, -1), config.max_occurrence_bins)
    bin_of = bins.assign(pop.occurrences) if bins is not None else np.full(len(pop.names), -1, np.int64)
    n_bins = len(bins.lows) if bins is not None else 0

    headline_n, headline_note = choose_headline_n(config.headline_n, n_values, pop.images_per_person)
    n_list = sorted(set(n_values) | ({headline_n} if headline_n is not None else set()))
    per_n = _sweep(pop, n_list, bin_of, n_bins, config, progress)
    full_stats = score_stats(paper_scores(pop), pop.members, bin_of, n_bins, n_templates, config)
    everyone = np.ones(len(pop.names), bool)
    counts = {k: v for k, v in _population_counts(pop, everyone).items() if not k.startswith("left_out")}
    full = summarise_full(full_stats, counts, pop.images_per_person, n_templates, config)
    by_n = [summarise_draws(n, per_n[n][1], per_n[n][0], config) for n in n_values]
    headline = None
    if headline_n is not None:
        counts, stats = per_n[headline_n]
        headline = {**summarise_draws(headline_n, stats, counts, config), "n_requested": config.headline_n,
                    **curves_of_draws(stats, n_templates)}
    notes = _notes(by_n, coverage.left_out, headline_note, full, config)
    for note in notes:
        log.warning("%s", note)
    return {
        "schema_version": EVAL_SCHEMA_VERSION,
        "artifact": EVAL_ARTIFACT,
        "created_at": utc_now(),
        "report": {"dir": str(report_dir), "created_at": _report_created_at(report_dir, summary),
                   "model": summary.get("model"),
                   "tau": (summary.get("parameters") or {}).get("tau"), "templates": n_templates,
                   "candidates": len(preds.candidates)},
        "config": {**asdict(config), "n_values": list(n_values), "low_fpr_targets": list(config.low_fpr_targets),
                   "out_dir": str(eval_out_dir(report_dir, config)),
                   "std": "population std over draws (ddof = 0)",
                   "draw_rule": "per person, n of its usable images uniformly without replacement; depends only "
                                "on (seed, n, draw index, name)"},
        "labels": {"file": str(labels_path), "source": labels_source,
                   "has_occurrences": labels.has_occurrences_column},
        "counts": {"persons_with_images": coverage.persons_with_images,
                   "persons_without_images": coverage.persons_without_images,
                   "evaluated_persons": len(pop.names), "members": int(pop.members.sum()),
                   "non_members": int((~pop.members).sum()),
                   **{k: len(v) for k, v in coverage.left_out.items()}},
        "left_out": coverage.left_out,
        "notes": notes,
        "headline": headline,
        "full": full,
        "by_n": by_n,
        "occurrences": (_occurrence_section(bins, bin_of, pop, per_n, n_values, full_stats)
                        if bins is not None else None),
        "library_versions": library_versions(),
    }


def evaluate_report(report_dir: Path, labels_path: Path | None = None, config: EvalConfig = EvalConfig(),
                    progress: Progress = no_progress) -> EvalResult:
    """Evaluate the report `query` wrote in report_dir against membership labels; see the module docstring.

    labels_path: CSV name,member[,occurrences]; None = the labels file recorded in the report's summary.json.
    Writes the evaluation folder (replacing an earlier evaluation there, nothing else) and lists its files
    in the report's summary.json under "evaluation".
    """
    report_dir = Path(report_dir)
    out_dir = eval_out_dir(report_dir, config)
    _check_out_dir(out_dir)
    metrics = compute_evaluation(report_dir, labels_path, config, progress)
    with staged_directory(out_dir, replace_existing=True) as tmp:
        progress("write evaluation", 0, 1)
        metrics["files"] = write_evaluation_files(tmp, metrics)
        metrics["files"][METRICS_FILE] = "every number of the evaluation, its configuration and counts"
        write_json_atomic(tmp / METRICS_FILE, metrics)
        progress("write evaluation", 1, 1)
    files = [out_dir / name for name in metrics["files"]]
    _record_in_summary(report_dir, out_dir, files, metrics["created_at"])
    return EvalResult(out_dir, metrics, files)


def _report_created_at(report_dir: Path, summary: dict) -> str | None:
    """When the report was written: run.json has it (older reports kept it in summary.json)."""
    try:
        return json.loads((Path(report_dir) / "run.json").read_text(encoding="utf-8")).get("created_at")
    except (OSError, ValueError, AttributeError):
        return summary.get("created_at")


def _record_in_summary(report_dir: Path, out_dir: Path, files: list[Path], created_at: str) -> None:
    """List the evaluation's files in the report's summary.json (every other key kept), atomically."""
    summary_path = report_dir / SUMMARY
    summary = json.loads(summary_path.read_text(encoding="utf-8"))  # re-read: keep whatever changed meanwhile
    summary["evaluation"] = {
        "dir": _relative_to_report(out_dir, report_dir),
        "metrics": _relative_to_report(out_dir / METRICS_FILE, report_dir),
        "files": [_relative_to_report(f, report_dir) for f in files],
        "created_at": created_at,
    }
    write_json_atomic(summary_path, summary)
