"""What `attack` returns: typed, frozen results, and pandas tables of them for notebooks.

pandas is imported inside the `*_frame` methods only, so `import idia_engine` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from idia_engine.engine.query.images import Skipped
    from idia_engine.engine.query.votes import PaperModeVotes


@dataclass(frozen=True)
class TemplateVote:
    """One (person, template) cell of paper mode: the person's photos voted with this template's prompts."""

    template: str  # the prompt template, `{0}` where the name goes
    mode: str | None  # the unique most frequent predicted name; None on a tie for first place or without photos
    mode_votes: int  # votes of the most frequent name (tied or not)
    true_votes: int  # votes for the person's true name
    hit: bool  # mode == the true name: this template counts towards the score


@dataclass(frozen=True)
class PersonResult:
    """The attack's verdict on one person."""

    name: str  # the person's name (NFC-normalised, whitespace stripped)
    n_photos: int  # photos that voted (usable ones; undecodable ones are in AttackResult.skipped)
    score: int  # templates hit, 0..T; higher = more likely a member
    decision: bool  # member iff score >= tau
    in_candidates: bool  # the name was among `names` (False: added as a candidate for this run)
    label: bool | None  # the ground truth given in `labels` (None: not labelled)
    templates: tuple[TemplateVote, ...]  # per template, in template order


@dataclass(frozen=True)
class PhotoResult:
    """The names one photo was closest to, per template."""

    person: str  # whose photo it is
    source: str  # the path as given, or "<image i>" for the person's i-th photo given as a PIL image
    top_names: tuple[tuple[str, ...], ...]  # [T][k]: per template the k best candidate names, best first
    top_cosines: np.ndarray  # float32 [T, k]: their cosine similarities (higher = closer), same order

    @property
    def top1(self) -> tuple[str, ...]:
        """Per template, the predicted name (the arg-max; ties go to the lower candidate id)."""
        return tuple(names[0] for names in self.top_names)


@dataclass(frozen=True)
class Metrics:
    """Decisions against the labels, over the labelled persons with at least one usable photo. A rate whose
    denominator is 0 is None (undefined), never a made-up 0."""

    tau: int  # member iff score >= tau
    persons: int  # labelled persons counted
    members: int  # of them labelled members
    non_members: int  # of them labelled non-members
    tp: int  # members decided members
    fp: int  # non-members decided members
    tn: int  # non-members decided non-members
    fn: int  # members decided non-members
    tpr: float | None  # tp / members: how many members the attack finds
    fpr: float | None  # fp / non-members: how many non-members it wrongly calls members
    accuracy: float | None  # (tp + tn) / persons
    precision: float | None  # tp / (tp + fp)
    unlabelled: tuple[str, ...]  # persons attacked without a label
    labels_for_unknown_names: tuple[str, ...]  # labelled names that were not attacked

    @classmethod
    def from_engine(cls, tau: int, metrics: dict[str, Any], info: dict[str, Any]) -> Metrics:
        """From the engine's `label_metrics` (the one definition of these rates)."""
        return cls(tau=tau, persons=metrics["persons"], members=metrics["members"],
                   non_members=metrics["non_members"], tp=metrics["TP"], fp=metrics["FP"], tn=metrics["TN"],
                   fn=metrics["FN"], tpr=metrics["TPR"], fpr=metrics["FPR"], accuracy=metrics["accuracy"],
                   precision=metrics["precision"], unlabelled=tuple(info["unlabelled_persons"]),
                   labels_for_unknown_names=tuple(info["labels_for_unknown_names"]))


@dataclass(frozen=True)
class AttackResult:
    """Everything one in-memory attack found: per person, per (person, template) cell, per photo.

    `to_pandas()` (= `persons_frame()`) has a row per person; `modes_frame()` a row per (person, template);
    `predictions_frame()` a row per (photo, template, rank).
    """

    persons: tuple[PersonResult, ...]  # in name order (as query's persons.csv)
    photos: tuple[PhotoResult, ...]  # the usable photos, person by person
    skipped: tuple[Skipped, ...]  # photos not used, and why (unreadable, not an image, ...)
    templates: tuple[str, ...]  # the prompt templates, in order
    candidates: tuple[str, ...]  # candidate id -> name: `names` de-duplicated, then the added persons
    candidates_added_for_this_run: tuple[str, ...]  # attacked persons whose name was not among `names`
    tau: int  # member iff score >= tau
    metrics: Metrics | None  # against `labels` (None without labels)
    votes: PaperModeVotes  # the engine's vote arrays (P persons x T templates), for further analysis

    def person(self, name: str) -> PersonResult:
        """The result of the person called `name`."""
        from idia_engine.engine.candidates.names_file import normalize_name
        from idia_engine.engine.errors import InputError

        wanted = normalize_name(name)
        for p in self.persons:
            if p.name == wanted:
                return p
        raise InputError(f"{name!r} was not attacked; attacked persons: "
                         f"{', '.join(p.name for p in self.persons[:5])}{', ...' if len(self.persons) > 5 else ''}")

    def to_pandas(self) -> pd.DataFrame:
        """One row per person (see `persons_frame`)."""
        return self.persons_frame()

    def persons_frame(self) -> pd.DataFrame:
        """One row per person: name, n_photos, score (0..T), decision, label, in_candidates, hits (one 0/1 per
        template, space-separated, as in persons.csv)."""
        import pandas as pd

        return pd.DataFrame({
            "name": [p.name for p in self.persons],
            "n_photos": np.array([p.n_photos for p in self.persons], np.int64),
            "score": np.array([p.score for p in self.persons], np.int64),
            "decision": np.array([p.decision for p in self.persons], bool),
            "label": pd.array([p.label for p in self.persons], dtype="boolean"),
            "in_candidates": np.array([p.in_candidates for p in self.persons], bool),
            "hits": [" ".join(str(int(v.hit)) for v in p.templates) for p in self.persons],
        })

    def modes_frame(self) -> pd.DataFrame:
        """One row per (person, template): person, template_index, template, mode (None on a tie or without
        photos), mode_votes, true_votes, hit."""
        import pandas as pd

        rows = [(p.name, t, v.template, v.mode, v.mode_votes, v.true_votes, v.hit)
                for p in self.persons for t, v in enumerate(p.templates)]
        return pd.DataFrame(rows, columns=["person", "template_index", "template", "mode", "mode_votes",
                                           "true_votes", "hit"])

    def predictions_frame(self) -> pd.DataFrame:
        """One row per (photo, template, rank): person, photo (its source), template_index, template, rank
        (1 = the predicted name), name, cosine (higher = closer)."""
        import pandas as pd

        n_photos, n_templates = len(self.photos), len(self.templates)
        k = self.photos[0].top_cosines.shape[1] if self.photos else 0
        per_photo = n_templates * k
        return pd.DataFrame({
            "person": np.repeat(np.array([ph.person for ph in self.photos], dtype=object), per_photo),
            "photo": np.repeat(np.array([ph.source for ph in self.photos], dtype=object), per_photo),
            "template_index": np.tile(np.repeat(np.arange(n_templates), k), n_photos),
            "template": np.tile(np.repeat(np.array(self.templates, dtype=object), k), n_photos),
            "rank": np.tile(np.arange(1, k + 1), n_templates * n_photos),
            "name": np.array([name for ph in self.photos for names in ph.top_names for name in names], dtype=object),
            "cosine": np.concatenate([ph.top_cosines.reshape(-1) for ph in self.photos] + [np.zeros(0, np.float32)]),
        })
