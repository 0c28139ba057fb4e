"""Who the evaluation is over, and the seeded draws of n images per person.

Inputs: the report's cached predictions and summary, the labels, and the people the metrics are over
(labelled, queried, with a candidate name). Draws: a person's draw depends only on (seed, n, draw index,
name), so adding or removing people never changes anyone else's draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..candidates.names_file import name_hash64
from ..disk.textfiles import read_artifact_json
from ..errors import ArtifactError, InputError
from ..query.cells import TRUE_UNRESOLVED, WITNESSED
from ..query.labels import LabelTable
from ..query.report import (
    PREDICTIONS,
    REPORT_ARTIFACT,
    REPORT_SCHEMA_VERSION,
    SUMMARY,
    TOP1_STATUS,
    Predictions,
    load_predictions,
)
from ..query.votes import paper_mode_votes

NOT_A_CANDIDATE = -2  # true id of a person whose name is not a candidate: never predicted, so never a hit


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
    topk_ids: np.ndarray  # int32 [M, T, k]: the report's candidates per image and template, best first
    topk_scores: np.ndarray  # float32 [M, T, k]: their cosines (the continuous scores read them)

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
    _require_exact_top1s(report_dir)
    preds = load_predictions(report_dir)
    ids = preds.topk_ids
    if ids.ndim != 3 or ids.shape[1] < 1 or ids.shape[2] < 1 or ids.shape[0] != len(preds.images):
        raise ArtifactError(f"{report_dir / PREDICTIONS / 'topk_ids.npy'} has shape {ids.shape}; expected "
                            f"[images = {len(preds.images)} rows of images.csv, templates >= 1, k >= 1]")
    return summary, preds


def _require_exact_top1s(report_dir: Path) -> None:
    """The protocol re-votes over random subsets of each person's photos, which needs every photo's exact
    top-1: a cell settled by witnesses is certified for the person's whole photo set only."""
    path = Path(report_dir) / PREDICTIONS / TOP1_STATUS
    if not path.is_file():  # reports written before statuses were recorded: per-prediction search
        return
    status = np.load(path, mmap_mode="r")
    open_ = int(np.isin(status, (WITNESSED, TRUE_UNRESOLVED)).sum())
    if open_:
        raise InputError(f"report {report_dir}: {open_} of {status.size} top-1s are only certified for each "
                         "person's whole photo set (cells settled by witnesses), but the protocol re-votes "
                         "subsets of photos; run `query` again with --no-cells")


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
    topk_ids = np.asarray(preds.topk_ids[rows])
    topk_scores = np.asarray(preds.topk_scores[rows])
    if topk_scores.shape != topk_ids.shape:
        raise ArtifactError(f"report predictions disagree: topk_scores.npy has shape {preds.topk_scores.shape}, "
                            f"topk_ids.npy {preds.topk_ids.shape}; run `query` again")
    top1 = topk_ids[:, :, 0].astype(np.int64)

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
    return (Population(labelled, members, occurrences, true_ids, top1, person_of_image, topk_ids, topk_scores),
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
    return np.array([name_hash64(n) for n in names], dtype=np.uint64)


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


def paper_scores(pop: Population, selected: np.ndarray | None = None) -> np.ndarray:
    """int64 [L]: paper-mode score of every person from the selected images (all images if None)."""
    if selected is None:
        return paper_mode_votes(pop.top1, pop.person_of_image, pop.true_ids).scores
    return paper_mode_votes(pop.top1[selected], pop.person_of_image[selected], pop.true_ids).scores


def population_counts(pop: Population, eligible: np.ndarray) -> dict[str, int]:
    m = pop.members
    return {"persons": int(eligible.sum()), "members": int((eligible & m).sum()),
            "non_members": int((eligible & ~m).sum()), "left_out": int((~eligible).sum()),
            "left_out_members": int((~eligible & m).sum()), "left_out_non_members": int((~eligible & ~m).sum())}
