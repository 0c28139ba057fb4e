"""`compare`: two or more reports of different models over the same persons and photos, in one report.

The first report is the baseline (e.g. the model before unlearning); every other one is compared with it.
Per person: each model's paper-mode score, decision and vote share, the change against the baseline,
and whether the decision flipped. Per pair of models: McNemar's exact test on the decisions and the
Wilcoxon signed-rank test on the paper scores and the vote shares (paired.py), over everyone and, with
labels, over members and non-members apart. With labels, each model's TPR and FPR at tau with
Clopper-Pearson intervals, and AUC of every score with bootstrap intervals over persons.

Scores are recomputed from each report's cached predictions over the photos the reports share (inputs.py),
so that with --overlap they cover the same photos; without it they equal the reports' own scores.

comparison.json: schema_version, artifact, created_at; reports [{label, dir, model, index_kind, candidates,
templates}]; alignment (persons, photos, dropped per report, candidates shared / only in one report);
tau; labels (file, source; null without labels); models {label: {decided_member, mean_score, rates, AUC}};
pairs [{baseline, other, decisions (McNemar), scores {paper, vote_share: Wilcoxon}, groups {members,
non_members: the same two tests}}]; notes; files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..disk.atomic import check_replaceable_output, check_swappable, staged_directory, write_json_atomic
from ..disk.textfiles import check_finite_number, check_whole_number
from ..disk.versions import library_versions, utc_now
from ..errors import InputError
from ..evaluate.intervals import BOOTSTRAP_RESAMPLES, CONFIDENCE, rate_entry, rate_sentence
from ..evaluate.score_table import auc_statistic, value_with_interval
from ..evaluate.scores import continuous_scores
from ..progress import Progress, no_progress
from ..query.labels import read_label_table
from ..query.votes import check_tau, paper_mode_votes
from .inputs import Alignment, ModelReport, align, read_reports
from .paired import mcnemar_exact, wilcoxon_signed_rank
from .render import write_comparison_files

log = logging.getLogger(__name__)

COMPARE_SCHEMA_VERSION = 1
COMPARE_ARTIFACT = "idia-engine comparison"
COMPARISON_FILE = "comparison.json"


@dataclass(frozen=True)
class CompareConfig:
    """Everything `compare_reports` needs besides the reports."""

    out_dir: Path  # the comparison folder; an earlier comparison there is replaced, nothing else
    labels_path: Path | None = None  # ground truth (any labels format); None = the file every report recorded, if one
    overlap: bool = False  # compare the persons and photos all reports share, instead of refusing differences
    tau: int | None = None  # member iff score >= tau; None = the reports' own tau (they must agree)
    seed: int = 0  # seeds the bootstrap of AUC intervals
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES  # resamples of persons per AUC interval
    confidence: float = CONFIDENCE  # of every interval

    def __post_init__(self) -> None:
        check_whole_number("--seed", self.seed, 0)
        # tau's range 1..T is checked once the reports give T (check_tau); its type here, before any work.
        if self.tau is not None and (not isinstance(self.tau, (int, np.integer)) or isinstance(self.tau, bool)):
            raise InputError(f"--tau must be a whole number, got {self.tau!r}")
        check_whole_number("bootstrap resamples", self.bootstrap_resamples, 100, 1_000_000,
                           "each resample recomputes every interval")
        check_finite_number("confidence", self.confidence, valid="in [0.5, 1), e.g. 0.95")
        if not 0.5 <= self.confidence < 1:
            raise InputError(f"confidence must be in [0.5, 1), e.g. 0.95, got {self.confidence!r}")
        check_swappable(Path(self.out_dir), "--out")


@dataclass(frozen=True)
class ModelScores:
    """One model's numbers over the aligned persons (P of them)."""

    paper: np.ndarray  # int64 [P]: paper-mode score 0..T
    decisions: np.ndarray  # bool [P]: paper >= tau
    vote_share: np.ndarray  # float64 [P]
    margin: np.ndarray  # float64 [P] (an upper bound where the true name left the top-k)
    calibrated: np.ndarray  # float64 [P]
    n_images: np.ndarray  # int64 [P]: shared photos per person


@dataclass(frozen=True)
class CompareResult:
    out_dir: Path  # the comparison folder
    comparison: dict  # what comparison.json holds
    files: list[Path] = field(default_factory=list)  # every file written


def _scores_of(report: ModelReport, alignment: Alignment, rows: np.ndarray, tau: int) -> ModelScores:
    true_ids = report.true_ids(alignment.persons)
    ids = np.asarray(report.preds.topk_ids[rows])
    cos = np.asarray(report.preds.topk_scores[rows])
    votes = paper_mode_votes(ids[:, :, 0].astype(np.int64), alignment.person_of_image, true_ids)
    cont = continuous_scores(ids, cos, alignment.person_of_image, true_ids)
    return ModelScores(votes.scores, votes.scores >= tau, cont.vote_share, cont.margin, cont.calibrated,
                       votes.n_images.astype(np.int64))


def _common_tau(reports: list[ModelReport], requested: int | None) -> int:
    if requested is not None:
        return requested
    taus = {r.label: r.tau for r in reports}
    if len(set(taus.values())) != 1 or None in taus.values():
        raise InputError(f"the reports decide with different tau ({', '.join(f'{k}: {v}' for k, v in taus.items())}); "
                         "pass --tau to decide all of them alike")
    return int(next(iter(taus.values())))


def _templates(reports: list[ModelReport]) -> int:
    counts = {r.label: int(r.preds.topk_ids.shape[1]) for r in reports}
    if len(set(counts.values())) != 1:
        raise InputError(f"the reports use different numbers of prompt templates "
                         f"({', '.join(f'{k}: {v}' for k, v in counts.items())}); paper-mode scores are not comparable")
    return next(iter(counts.values()))


def _labels(reports: list[ModelReport], config: CompareConfig) -> tuple[Path | None, str | None]:
    if config.labels_path is not None:
        return Path(config.labels_path), "given"
    recorded = {(r.summary.get("parameters") or {}).get("labels_file") for r in reports}
    if len(recorded) == 1 and None not in recorded and Path(next(iter(recorded))).is_file():
        return Path(next(iter(recorded))), "recorded by every report"
    return None, None


def _model_entry(report: ModelReport, scores: ModelScores, members: np.ndarray | None,
                 config: CompareConfig) -> dict:
    entry = {"decided_member": int(scores.decisions.sum()), "decided_non_member": int((~scores.decisions).sum()),
             "mean_score": float(scores.paper.mean()), "mean_vote_share": float(np.nanmean(scores.vote_share))}
    if members is not None:
        labelled = ~np.isnan(members)
        m = members[labelled].astype(bool)
        d = scores.decisions[labelled]
        entry["rates"] = {"TPR": rate_entry(int((d & m).sum()), int(m.sum()), config.confidence),
                          "FPR": rate_entry(int((d & ~m).sum()), int((~m).sum()), config.confidence)}
        entry["AUC"] = {name: value_with_interval(auc_statistic, values[labelled], m, config.seed,
                                                  config.bootstrap_resamples, config.confidence)
                        for name, values in (("paper", scores.paper), ("vote_share", scores.vote_share),
                                             ("margin", scores.margin), ("calibrated", scores.calibrated))}
    return entry


def _pair_tests(a: ModelScores, b: ModelScores, keep: np.ndarray) -> dict:
    return {"decisions": mcnemar_exact(a.decisions[keep], b.decisions[keep]),
            "scores": {"paper": wilcoxon_signed_rank(a.paper[keep], b.paper[keep]),
                       "vote_share": wilcoxon_signed_rank(a.vote_share[keep], b.vote_share[keep])}}


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything but an earlier comparison, as it was written (or an empty directory)."""
    check_replaceable_output(out_dir, COMPARISON_FILE, COMPARE_ARTIFACT, "comparison")


def compare_reports(report_dirs: list[Path], config: CompareConfig,
                    progress: Progress = no_progress) -> CompareResult:
    """Compare the reports (the first is the baseline); write the comparison folder; see the module docstring."""
    out_dir = Path(config.out_dir)
    resolved_out = out_dir.resolve()
    for d in report_dirs:
        if Path(d).resolve().is_relative_to(resolved_out):
            raise InputError(f"--out {out_dir} would replace the report {d}; choose a folder outside the reports")
    _check_out_dir(out_dir)
    reports = read_reports(report_dirs)
    n_templates = _templates(reports)
    tau = _common_tau(reports, config.tau)
    check_tau(tau, n_templates)
    alignment = align(reports, config.overlap)
    progress("compare models", 0, len(reports))
    scores = []
    for i, (report, rows) in enumerate(zip(reports, alignment.rows)):
        scores.append(_scores_of(report, alignment, rows, tau))
        progress("compare models", i + 1, len(reports))

    labels_path, labels_source = _labels(reports, config)
    members = None
    if labels_path is not None:
        table = read_label_table(labels_path)
        members = np.array([float(table.members[p]) if p in table.members else np.nan for p in alignment.persons])
        if np.isnan(members).all():
            raise InputError(f"labels file {labels_path} labels none of the {len(alignment.persons)} compared people "
                             f"(e.g. {alignment.persons[0]!r}); the names must match the reports' person names")

    notes = []
    for label, d in alignment.dropped.items():
        if d["persons"] or d["photos"]:
            notes.append(f"{label}: {d['persons']} person(s) and {d['photos']} photo(s) not shared by every report "
                         "are left out (--overlap)")
    if any(alignment.candidates["only_here"].values()):
        notes.append("the candidate sets differ (" + ", ".join(f"{k}: {v} names only there" for k, v in
                                                             alignment.candidates["only_here"].items())
                     + "): a score change may come from the candidates, not only the model")
    pairs = []
    base = scores[0]
    everyone = np.ones(len(alignment.persons), bool)
    for report, other in zip(reports[1:], scores[1:]):
        entry = {"baseline": reports[0].label, "other": report.label, **_pair_tests(base, other, everyone)}
        if members is not None:
            entry["groups"] = {group: _pair_tests(base, other, mask) for group, mask in
                               (("members", members == 1), ("non_members", members == 0)) if mask.any()}
        flips = entry["decisions"]
        notes.append(f"{report.label} vs {reports[0].label}: {flips['member_to_non_member']} decision(s) member -> "
                     f"non-member, {flips['non_member_to_member']} non-member -> member "
                     f"(McNemar exact p = {flips['p_value']:.3g})")
        pairs.append(entry)
    models = {r.label: _model_entry(r, s, members, config) for r, s in zip(reports, scores)}
    if members is not None:
        m = members[~np.isnan(members)].astype(bool)
        for label, entry in models.items():
            tp = entry["rates"]["TPR"]["k"]
            fp = entry["rates"]["FPR"]["k"]
            notes.append(f"{label}: " + rate_sentence("TPR", tp, int(m.sum()), "members", config.confidence)
                         + "; " + rate_sentence("FPR", fp, int((~m).sum()), "non-members", config.confidence))
    for note in notes:
        log.info("%s", note)

    comparison = {
        "schema_version": COMPARE_SCHEMA_VERSION,
        "artifact": COMPARE_ARTIFACT,
        "created_at": utc_now(),
        "reports": [{"label": r.label, "dir": str(r.report_dir), "model": r.model,
                     "index_kind": (r.summary.get("index") or {}).get("index_kind"),
                     "candidates": len(r.preds.candidates), "templates": n_templates} for r in reports],
        "alignment": {"persons": len(alignment.persons), "photos": int(len(alignment.person_of_image)),
                      "overlap": config.overlap, "dropped": alignment.dropped, "candidates": alignment.candidates},
        "tau": tau,
        "labels": None if labels_path is None else {"file": str(labels_path), "source": labels_source,
                                                    "labelled": int((~np.isnan(members)).sum())},
        "config": {"seed": config.seed, "bootstrap_resamples": config.bootstrap_resamples,
                   "confidence": config.confidence, "overlap": config.overlap},
        "models": models,
        "pairs": pairs,
        "notes": notes,
        "library_versions": library_versions(),
    }
    rows = person_rows(reports, alignment, scores, members)
    with staged_directory(out_dir, replace_existing=True) as tmp:
        comparison["files"] = write_comparison_files(tmp, comparison, rows)
        comparison["files"][COMPARISON_FILE] = "every number of the comparison, the reports compared and notes"
        write_json_atomic(tmp / COMPARISON_FILE, comparison)
    return CompareResult(out_dir, comparison, [out_dir / name for name in comparison["files"]])


def person_rows(reports: list[ModelReport], alignment: Alignment, scores: list[ModelScores],
                members: np.ndarray | None) -> dict:
    """{"header": [...], "rows": [[...]]}: one row per compared person."""
    labels = [r.label for r in reports]
    header = ["name", "n_images"] + (["label"] if members is not None else [])
    header += [f"{kind}_{label}" for label in labels for kind in ("score", "decision", "vote_share")]
    header += [f"{kind}_{label}" for label in labels[1:] for kind in ("change", "flipped")]
    rows = []
    for p, name in enumerate(alignment.persons):
        row = [name, int(scores[0].n_images[p])]
        if members is not None:
            row.append("" if np.isnan(members[p]) else ("member" if members[p] else "non-member"))
        for s in scores:
            row += [int(s.paper[p]), "member" if s.decisions[p] else "non-member", float(s.vote_share[p])]
        for s in scores[1:]:
            before, after = scores[0].decisions[p], s.decisions[p]
            row += [int(s.paper[p] - scores[0].paper[p]),
                    "" if before == after else ("member -> non-member" if before else "non-member -> member")]
        rows.append(row)
    return {"header": header, "rows": rows}
