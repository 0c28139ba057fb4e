"""Where one request's score falls among the labelled people of a reference report (`serve --reference`).

The reference is a report `query` wrote over the same index, with labels (those its summary.json records,
or `--reference-labels`). For a score s the answer is how many of its members and of its non-members
score at least s: the TPR and FPR a threshold at s would have on that population, each with its
Clopper-Pearson interval. It also gives the calibrated score its reference share: how often the other
reference people's (photo, template) pairs pick this name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ManifestMismatchError
from ..evaluate.intervals import CONFIDENCE, rate_entry
from ..evaluate.population import build_population, open_report, paper_scores, resolve_labels_path
from ..evaluate.scores import continuous_scores
from ..index.reader import NameIndex
from ..query.labels import read_label_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferencePopulation:
    report_dir: Path
    labels_path: Path
    names: list[str]  # the labelled people with photos
    members: np.ndarray  # bool [L]
    paper: np.ndarray  # int64 [L]
    vote_share: np.ndarray  # float64 [L]
    photos: np.ndarray  # int64 [L]: photos each of them voted with
    top1: np.ndarray  # int64 [M, T]: every reference photo's predicted candidate per template
    person_of_image: np.ndarray  # int64 [M]
    n_candidates: int  # the reference report's candidates: the index's names, then the ones it added

    @property
    def n_members(self) -> int:
        return int(self.members.sum())

    @property
    def n_non_members(self) -> int:
        return int((~self.members).sum())

    def placement(self, paper: int, vote_share: float, confidence: float = CONFIDENCE) -> dict:
        """For a paper score and a vote share: members and non-members of the reference at or above each."""
        out = {"report": self.report_dir.name, "members": self.n_members, "non_members": self.n_non_members,
               "median_photos": float(np.median(self.photos)) if len(self.photos) else None,
               "confidence": confidence}
        for key, mine, theirs in (("paper", paper, self.paper), ("vote_share", vote_share, self.vote_share)):
            at_or_above = theirs >= mine - 1e-12
            out[key] = {
                "members_at_or_above": rate_entry(int((at_or_above & self.members).sum()), self.n_members,
                                                  confidence),
                "non_members_at_or_above": rate_entry(int((at_or_above & ~self.members).sum()),
                                                      self.n_non_members, confidence),
            }
        return out

    def share_picking(self, candidate_id: int, name: str, n_index_names: int) -> float | None:
        """The share of the reference's (photo, template) pairs, the person with this name left out, whose top-1
        is this candidate; None when the name was not a candidate of the reference (its photos were never
        compared with it)."""
        if candidate_id >= n_index_names:  # added for this request: not one of the reference's candidates
            return None
        others = np.array([n != name for n in self.names])[self.person_of_image]
        pairs = int(others.sum()) * self.top1.shape[1]
        if pairs == 0:
            return None
        return float((self.top1[others] == candidate_id).sum() / pairs)


def load_reference(report_dir: Path, labels_path: Path | None, index: NameIndex) -> ReferencePopulation:
    """The labelled people of a report over `index`; ManifestMismatchError if the report is over another index."""
    report_dir = Path(report_dir)
    summary, preds = open_report(report_dir)
    recorded = summary.get("index") or {}
    manifest = index.manifest
    for key, mine in (("names_sha256", manifest.names_sha256), ("num_templates", manifest.num_templates)):
        if recorded.get(key) != mine:
            raise ManifestMismatchError(
                f"--reference {report_dir} was written over another index ({key} {recorded.get(key)!r}, this "
                f"index {mine!r}); give a report that `query` wrote over --index-dir {index.root}")
    if (summary.get("model") or {}).get("fingerprint") != manifest.model_info.fingerprint:
        raise ManifestMismatchError(f"--reference {report_dir} was written with another model than index "
                                    f"{index.root}'s; give a report of this index's model")
    labels_path, _ = resolve_labels_path(report_dir, summary, labels_path)
    pop, _ = build_population(preds, read_label_table(labels_path), summary, labels_path)
    cont = continuous_scores(pop.topk_ids, pop.topk_scores, pop.person_of_image, pop.true_ids)
    log.info("reference %s: %d members, %d non-members", report_dir, int(pop.members.sum()),
             int((~pop.members).sum()))
    return ReferencePopulation(report_dir, Path(labels_path), pop.names, pop.members, paper_scores(pop),
                               np.nan_to_num(cont.vote_share), pop.images_per_person, pop.top1,
                               pop.person_of_image, len(preds.candidates))
