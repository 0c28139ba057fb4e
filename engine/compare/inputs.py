"""The reports a comparison reads, and the photos they share.

A comparison is fair only if the models were asked the same question: the same people, the same photos
(by content, SHA-256) and the same candidate names. By default any difference is refused, in one line
that says what differs and gives an example; with `overlap`, the comparison keeps the people and photos
every report has (and records what it dropped), and candidate sets that differ are recorded, not refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..evaluate.population import NOT_A_CANDIDATE, open_report
from ..query.report import Predictions


@dataclass(frozen=True)
class ModelReport:
    """One report of the comparison, as read from its folder."""

    label: str  # short name in tables and columns: the folder name, made unique
    report_dir: Path
    summary: dict  # summary.json
    preds: Predictions

    @property
    def model(self) -> dict:
        """model, pretrained, weights_source, fingerprint, as the report records them."""
        return dict(self.summary.get("model") or {})

    @property
    def tau(self) -> int | None:
        return (self.summary.get("parameters") or {}).get("tau")

    def photo_keys(self) -> list[tuple[str, str, int]]:
        """(person, photo sha256, the how-manieth copy of that photo for the person) per image row."""
        seen: Counter = Counter()
        keys = []
        for row in self.preds.images:
            pair = (row["name"], row["sha256"])
            keys.append((*pair, seen[pair]))
            seen[pair] += 1
        return keys

    def true_ids(self, persons: list[str]) -> np.ndarray:
        """int64 [P]: each person's candidate id in this report, NOT_A_CANDIDATE if the name is none."""
        first: dict[str, int] = {}
        for cand_id, name in enumerate(self.preds.candidates):
            first.setdefault(name, cand_id)
        return np.array([first.get(p, NOT_A_CANDIDATE) for p in persons], np.int64)


@dataclass(frozen=True)
class Alignment:
    """The photos all reports share, in the first report's order, and what was left out."""

    persons: list[str]  # the people compared (with at least one shared photo), first report's order
    person_of_image: np.ndarray  # int64 [M]: 0..P-1 per shared photo
    rows: list[np.ndarray]  # per report, int64 [M]: its image row of each shared photo
    dropped: dict[str, dict[str, int]]  # per report label: persons / photos not shared with every other report
    candidates: dict  # shared, and per report label only_here


def _unique_labels(report_dirs: list[Path]) -> list[str]:
    labels, seen = [], Counter()
    for d in report_dirs:
        base = Path(d).resolve().name or str(d)
        seen[base] += 1
        labels.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return labels


def read_reports(report_dirs: list[Path]) -> list[ModelReport]:
    """Open every report (each one refused in one line if it is not a report); at least two, all distinct."""
    report_dirs = [Path(d) for d in report_dirs]
    if len(report_dirs) < 2:
        raise InputError(f"compare needs at least two reports, got {len(report_dirs)}")
    resolved = [d.resolve() for d in report_dirs]
    for i, d in enumerate(resolved):
        if d in resolved[:i]:
            raise InputError(f"report {report_dirs[i]} is given twice; compare different reports")
    out = []
    for label, d in zip(_unique_labels(report_dirs), report_dirs):
        summary, preds = open_report(d)
        out.append(ModelReport(label, d, summary, preds))
    return out


def _example(items) -> str:
    items = sorted(items)
    return f" (e.g. {items[0]!r})" if items else ""


def align(reports: list[ModelReport], overlap: bool) -> Alignment:
    """The shared photos; without `overlap`, InputError on any difference of persons, photos or candidates."""
    base = reports[0]
    keys = [r.photo_keys() for r in reports]
    persons = [list(dict.fromkeys(row["name"] for row in r.preds.images)) for r in reports]
    candidate_sets = [set(r.preds.candidates) for r in reports]
    if not overlap:
        hint = "compare reports of the same persons, photos and candidate names, or pass --overlap"
        for r, p in zip(reports[1:], persons[1:]):
            missing, extra = set(persons[0]) - set(p), set(p) - set(persons[0])
            if missing or extra:
                raise InputError(f"reports {base.report_dir} and {r.report_dir} differ in their persons with photos: "
                                 f"{len(missing)} only in the first{_example(missing)}, {len(extra)} only in the "
                                 f"second{_example(extra)}; {hint}")
        for r, k in zip(reports[1:], keys[1:]):
            a, b = Counter(keys[0]), Counter(k)
            differ = {key[0] for key in (a - b) + (b - a)}
            if differ:
                raise InputError(f"reports {base.report_dir} and {r.report_dir} differ in the photos of {len(differ)} "
                                 f"person(s){_example(differ)} (compared by SHA-256 content); {hint}")
        for r, c in zip(reports[1:], candidate_sets[1:]):
            missing, extra = candidate_sets[0] - c, c - candidate_sets[0]
            if missing or extra:
                raise InputError(f"reports {base.report_dir} and {r.report_dir} differ in their candidate names: "
                                 f"{len(missing)} only in the first{_example(missing)}, {len(extra)} only in the "
                                 f"second{_example(extra)}; scores over different candidates are not comparable; "
                                 f"{hint}")
    shared = set(keys[0]).intersection(*map(set, keys[1:]))
    base_rows = np.array([i for i, key in enumerate(keys[0]) if key in shared], np.int64)
    ordered = [keys[0][i] for i in base_rows]
    shared_persons = list(dict.fromkeys(key[0] for key in ordered))
    if not shared_persons:
        raise InputError(f"the reports {', '.join(str(r.report_dir) for r in reports)} share no photo of any person "
                         "(compared by SHA-256 content); nothing to compare")
    local = {p: i for i, p in enumerate(shared_persons)}
    rows = [base_rows]
    for k in keys[1:]:
        where = {key: i for i, key in enumerate(k)}
        rows.append(np.array([where[key] for key in ordered], np.int64))
    common_candidates = set.intersection(*candidate_sets)
    dropped = {r.label: {"persons": len(set(p) - set(shared_persons)), "photos": len(k) - len(ordered)}
               for r, p, k in zip(reports, persons, keys)}
    return Alignment(shared_persons, np.array([local[key[0]] for key in ordered], np.int64), rows, dropped,
                     {"shared": len(common_candidates),
                      "only_here": {r.label: len(c - common_candidates) for r, c in zip(reports, candidate_sets)}})
