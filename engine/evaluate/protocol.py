"""`evaluate`: the paper's evaluation protocol over a cached attack report, plus membership-inference scores.

Why from the report: `query` stores every image's top-k candidates per template, so any subset of a
person's images can be voted again with array work alone (no re-encoding, no re-search).

What (docs/attack.md, step 8 and "Where the engine goes beyond the paper"):
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

The output folder (default <report>/evaluation/) is staged and swapped in atomically; render.py
renders its CSVs, plots and HTML from the metrics computed here. Afterwards the report's summary.json
lists the evaluation's files under "evaluation".

metrics.json: schema_version, artifact, created_at; report (dir, model, templates T, candidates); config;
labels (file, source, has_occurrences); counts and left_out (who is not evaluated, and why); notes;
headline (the n = 30 row of by_n plus n_requested, tau_sweep and roc, each number {"mean", "std"});
full (the same numbers as single values, from all images); by_n (one row per n: persons, members,
non_members, left_out*, draws, TP..TN, TPR, FNR, FPR, TNR, accuracy, AUC, TPR_at_FPR {"0.01", "0.001",
"0"}, intervals {rate: {low, high, k, n}}: Clopper-Pearson over people at the mean count); occurrences
(binning, bins, by_n, full; null without an occurrences column); scores (paper mode beside the continuous
scores, which are not the paper's: see score_table.py); files. `full` also has intervals (at its counts),
and `notes` say in words what the population can show (e.g. "0 of 100 non-members: FPR <= 3.6 % at 95 %").
Beside metrics.json, person_scores.csv holds every score of every evaluated person.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..disk.atomic import check_replaceable_output, check_swappable, staged_directory, write_json_atomic
from ..disk.textfiles import check_finite_number, check_whole_number
from ..disk.versions import library_versions, utc_now
from ..errors import InputError
from ..progress import Progress, no_progress
from ..query.labels import read_label_table
from ..query.report import (
    SUMMARY,
)
from ..query.votes import check_tau
from .drilldown import PageContext, read_run, redacted_metrics_paths
from .intervals import BOOTSTRAP_RESAMPLES, CONFIDENCE, low_fpr_sentences, rate_sentence
from .population import (
    LEFT_OUT_REASONS,
    ImageDraws,
    Population,
    build_population,
    open_report,
    paper_scores,
    population_counts,
    resolve_labels_path,
)
from .render import write_evaluation_files
from .score_table import PERSON_SCORE_HEADER, person_score_rows, scores_section
from .statistics import (
    OccurrenceBins,
    ScoreStats,
    curves_of_draws,
    fpr_key,
    json_number,
    mean_std,
    occurrence_bins,
    score_stats,
    summarise_draws,
    summarise_full,
)

log = logging.getLogger(__name__)

PAPER_N_VALUES = (*range(1, 30, 2), 30)  # 1, 3, 5, ..., 29, 30 (docs/attack.md, step 8)
EVAL_SCHEMA_VERSION = 1
EVAL_ARTIFACT = "idia-engine evaluation"
DEFAULT_EVAL_DIR = "evaluation"
METRICS_FILE = "metrics.json"
PERSON_SCORES_CSV = "person_scores.csv"


MAX_DRAWS = 100_000  # draws per n
MAX_RESAMPLES = 1_000_000  # bootstrap resamples per interval
MAX_N_VALUES = 10_000  # distinct n of one sweep


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
    confidence: float = CONFIDENCE  # of every interval: Clopper-Pearson for rates, the bootstrap for AUC, TPR@FPR
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES  # resamples of persons per bootstrapped number (seeded by seed)
    out_dir: Path | None = None  # the evaluation folder; None = <report_dir>/evaluation
    redact: bool = False  # leave photo paths, other people's names and full file paths out of the folder

    def __post_init__(self) -> None:
        """Check the options that do not depend on the report (tau's range does: `check_tau` once T is known)."""
        n_values = tuple(self.n_values)
        if not n_values:
            raise InputError("the list of n (images per person) is empty; give at least one n >= 1, e.g. 1,3,5,30")
        bad = [n for n in n_values if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1]
        if bad:
            raise InputError(f"n (images per person) must be whole numbers >= 1, got {bad[0]!r}")
        if len(set(n_values)) > MAX_N_VALUES:
            raise InputError(f"--n lists {len(set(n_values))} values of n; at most {MAX_N_VALUES} (each is a "
                             "sweep of every draw)")
        # (option, value, lowest, highest or None, why the cap): the caps bound work the user chooses.
        checks = [("--draws", self.draws, 1, MAX_DRAWS, "each draw re-votes every person at every n"),
                  ("--headline-n", self.headline_n, 1, None, ""), ("--seed", self.seed, 0, None, ""),
                  ("max occurrence bins", self.max_occurrence_bins, 1, None, ""),
                  ("bootstrap resamples", self.bootstrap_resamples, 100, MAX_RESAMPLES,
                   "each resample recomputes every interval")]
        for option, value, low, high, why in checks:
            check_whole_number(option, value, low, high, why)
        # tau's range 1..T is checked once T is known (check_tau); its type here, before any work.
        if not isinstance(self.tau, (int, np.integer)) or isinstance(self.tau, bool):
            raise InputError(f"--tau must be a whole number, got {self.tau!r}")
        check_finite_number("confidence", self.confidence, valid="in [0.5, 1), e.g. 0.95")
        if not 0.5 <= self.confidence < 1:
            raise InputError(f"confidence must be in [0.5, 1), e.g. 0.95, got {self.confidence!r}")
        for target in self.low_fpr_targets:
            check_finite_number("low-FPR target", target, valid="in [0, 1)")
            if not 0 <= target < 1:
                raise InputError(f"low-FPR target {target!r} must be in [0, 1)")
        if self.out_dir is not None:
            check_swappable(Path(self.out_dir), "--out")

    @property
    def sorted_n_values(self) -> tuple[int, ...]:
        """The distinct n values, ascending."""
        return tuple(sorted({int(n) for n in self.n_values}))


@dataclass(frozen=True)
class EvalResult:
    out_dir: Path  # the evaluation folder
    metrics: dict  # what metrics.json holds
    files: list[Path] = field(default_factory=list)  # every file written, metrics.json included


# ----------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------

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
    notes += population_sentences(full, config)
    return notes


def population_sentences(full: dict, config: EvalConfig) -> list[str]:
    """What the full report's people can show, in words: TPR and FPR at tau with their intervals, and each
    low-FPR target the non-members are too few to back."""
    out = []
    if full["members"]:
        out.append(f"at tau = {config.tau}: " + rate_sentence("TPR", full["TP"], full["members"], "members",
                                                              config.confidence))
    if full["non_members"]:
        out.append(f"at tau = {config.tau}: " + rate_sentence("FPR", full["FP"], full["non_members"], "non-members",
                                                              config.confidence))
    return out + low_fpr_sentences(full["non_members"], config.low_fpr_targets, config.confidence)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything but an earlier evaluation, as it was written (or an empty directory)."""
    check_replaceable_output(out_dir, METRICS_FILE, EVAL_ARTIFACT, "evaluation")


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
        out[n] = (population_counts(pop, eligible), stats)
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
                  "TPR": [mean_std([s.occurrence_tpr[b] for s in per_n[n][1]]) for b in range(len(members_in))]}
                 for n in n_values],
        "full": {"TPR": [json_number(x) for x in full_stats.occurrence_tpr]},
    }


def compute_evaluation(report_dir: Path, labels_path: Path | None = None, config: EvalConfig = EvalConfig(),
                       progress: Progress = no_progress) -> dict:
    """Every number of the evaluation (what metrics.json holds, less its "files"), writing nothing.

    labels_path: CSV name,member[,occurrences]; None = the labels file recorded in the report's summary.json.
    """
    return _evaluate(report_dir, labels_path, config, progress)[0]


def _evaluate(report_dir: Path, labels_path: Path | None, config: EvalConfig,
              progress: Progress) -> tuple[dict, PageContext]:
    """(metrics, what the report page needs beyond them)."""
    report_dir = Path(report_dir)
    n_values = config.sorted_n_values
    summary, preds = open_report(report_dir)
    n_templates = preds.topk_ids.shape[1]
    check_tau(config.tau, n_templates)
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
    counts = {k: v for k, v in population_counts(pop, everyone).items() if not k.startswith("left_out")}
    full = summarise_full(full_stats, counts, pop.images_per_person, n_templates, config)
    by_n = [summarise_draws(n, per_n[n][1], per_n[n][0], config) for n in n_values]
    headline = None
    if headline_n is not None:
        counts, stats = per_n[headline_n]
        headline = {**summarise_draws(headline_n, stats, counts, config), "n_requested": config.headline_n,
                    **curves_of_draws(stats, n_templates)}
    scores = scores_section(pop, headline_n, config)
    notes = _notes(by_n, coverage.left_out, headline_note, full, config)
    for note in notes:
        log.warning("%s", note)
    metrics = {
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
        "scores": scores,
        "library_versions": library_versions(),
    }
    if config.redact:
        redacted_metrics_paths(metrics)
    return metrics, PageContext(summary, read_run(report_dir), pop, preds, config.redact)


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
    metrics, page = _evaluate(report_dir, labels_path, config, progress)
    with staged_directory(out_dir, replace_existing=True) as tmp:
        progress("write evaluation", 0, 1)
        metrics["files"] = write_evaluation_files(tmp, metrics, page)
        write_person_scores(tmp / PERSON_SCORES_CSV, person_score_rows(page.pop))
        metrics["files"][PERSON_SCORES_CSV] = ("one row per evaluated person: member, n_images, the paper score "
                                               "and the continuous scores (not the paper's) from all images")
        metrics["files"][METRICS_FILE] = "every number of the evaluation, its configuration and counts"
        write_json_atomic(tmp / METRICS_FILE, metrics)
        progress("write evaluation", 1, 1)
    files = [out_dir / name for name in metrics["files"]]
    _record_in_summary(report_dir, out_dir, files, metrics["created_at"])
    return EvalResult(out_dir, metrics, files)


def write_person_scores(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(PERSON_SCORE_HEADER)
        w.writerows([["" if x is None else (f"{x:.9g}" if isinstance(x, float) else x) for x in row]
                     for row in rows])


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
