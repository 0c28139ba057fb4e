"""The attack report directory that `query` writes, and a reader for its predictions.

    report/
      summary.json               # parameters, counts, skipped files, metrics: a function of the inputs alone
      run.json                   # this run: when, timings per stage, images encoded now vs found in the store
      persons.csv                # one row per person: name,n_images,score,decision[,label],...
      modes.csv                  # one row per person and template: the plurality vote in detail
      predictions/
        topk_ids.npy             # int32 [M, T, k]: candidate ids, best first, per image and template
        topk_scores.npy          # float32 [M, T, k]: their cosine similarities (higher = closer)
        top1_status.npy          # int8 [M, T]: how each top-1 was obtained (exact, or settled by witnesses)
        images.csv               # row,name,path,sha256: the M images, in row order
        candidates.txt           # candidate id -> name, one per line (index names, then added names)

The whole directory is staged under a temporary name and swapped in at the end, so a reader never sees
a half-written report. Everything but run.json is byte-identical for the same inputs and arguments, also
when an earlier run of it was killed halfway.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..disk.atomic import write_json_atomic
from ..disk.versions import library_versions
from ..errors import ArtifactError, ArtifactExistsError, InputError
from .votes import NO_MODE, PaperModeVotes

REPORT_SCHEMA_VERSION = 1
REPORT_ARTIFACT = "idia-engine attack report"
SUMMARY = "summary.json"
RUN = "run.json"
PREDICTIONS = "predictions"
TOP1_STATUS = "top1_status.npy"

FILE_DESCRIPTIONS = {
    "summary.json": "parameters, counts, skipped files and (with labels) metrics; identical for identical inputs",
    "run.json": "this run only: created_at, timings per stage, images encoded now / found in the store",
    "persons.csv": "one row per person: name, n_images, score (0..T templates whose unique plurality is the "
                   "true name; higher = more likely a member), decision, label, in_index, true_votes, "
                   "tied_templates, hits (one 0/1 per template)",
    "modes.csv": "one row per person and template: name, template, mode (the unique most frequent predicted "
                 "name, empty on a tie), mode_votes, true_votes, hit, votes_exact (1: every photo's top-1 in the "
                 "cell is exact, so are mode, mode_votes and true_votes; 0: the cell was settled by witnesses, hit "
                 "is exact, the counts are those of the reported top-1s)",
    "predictions/topk_ids.npy": "int32 [images, templates, k]: candidate ids (rows of candidates.txt), best first",
    "predictions/topk_scores.npy": "float32 [images, templates, k]: cosine similarities of those candidates",
    "predictions/top1_status.npy": "int8 [images, templates]: how each top-1 was obtained: 0 exact by the index, "
                                   "1 certified exact, 2 brute force, 3 witnessed (a name proved to beat the true "
                                   "name; top-1 not exact), 4 true name on top of the candidates in a settled cell "
                                   "(top-1 not proved), 5 approximate (not certified, --no-fallback)",
    "predictions/images.csv": "row,name,path,sha256 of the images in row order",
    "predictions/candidates.txt": "candidate names, line i = id i (index names first, then names added for this run)",
}


def check_report_dir(out_dir: Path) -> None:
    """Refuse to replace anything but an earlier report (or an empty directory)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a directory")
    summary = out_dir / SUMMARY
    if summary.is_file():
        try:
            if json.loads(summary.read_text(encoding="utf-8")).get("artifact") == REPORT_ARTIFACT:
                return
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    if any(out_dir.iterdir()):
        raise ArtifactExistsError(f"--out {out_dir} is not empty and is not an idia-engine report; choose another --out")


def write_persons(path: Path, persons: list[str], votes: PaperModeVotes, decisions: np.ndarray,
                  labels: dict[str, bool] | None, in_index: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        header = ["name", "n_images", "score", "decision"]
        if labels is not None:
            header.append("label")
        header += ["in_index", "true_votes", "tied_templates", "hits"]
        w.writerow(header)
        tied = ((votes.modes == NO_MODE) & (votes.mode_votes > 0)).sum(axis=1)
        for p, name in enumerate(persons):
            row = [name, int(votes.n_images[p]), int(votes.scores[p]), "member" if decisions[p] else "non-member"]
            if labels is not None:
                row.append("" if name not in labels else ("member" if labels[name] else "non-member"))
            row += ["yes" if in_index[p] else "no", int(votes.true_votes[p].sum()), int(tied[p]),
                    "".join("1" if h else "0" for h in votes.hits[p])]
            w.writerow(row)


def write_modes(path: Path, persons: list[str], votes: PaperModeVotes, candidates: list[str],
                votes_exact: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "template", "mode", "mode_votes", "true_votes", "hit", "votes_exact"])
        for p, name in enumerate(persons):
            for t in range(votes.modes.shape[1]):
                mode = votes.modes[p, t]
                w.writerow([name, t, candidates[mode] if mode != NO_MODE else "", int(votes.mode_votes[p, t]),
                            int(votes.true_votes[p, t]), int(votes.hits[p, t]), int(votes_exact[p, t])])


def write_images_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["row", "name", "path", "sha256"])
        for i, (name, p, sha) in enumerate(rows):
            w.writerow([i, name, p, sha])


def write_summary(out_dir: Path, summary: dict) -> None:
    write_json_atomic(out_dir / SUMMARY, summary)


def write_run(out_dir: Path, run: dict) -> None:
    write_json_atomic(out_dir / RUN, {"schema_version": REPORT_SCHEMA_VERSION, "artifact": "idia-engine query run",
                                      **run})


@dataclass(frozen=True)
class Predictions:
    """The per-image, per-template top-k of a report."""

    topk_ids: np.ndarray  # int32 [M, T, k]
    topk_scores: np.ndarray  # float32 [M, T, k]
    images: list[dict[str, str]]  # rows of images.csv
    candidates: list[str]  # id -> name

    def top1_names(self) -> list[list[str]]:
        """[M][T] predicted names (the arg-max per image and template)."""
        return [[self.candidates[i] for i in row] for row in self.topk_ids[:, :, 0]]


def load_predictions(report_dir: Path, mmap: bool = True) -> Predictions:
    folder = Path(report_dir) / PREDICTIONS
    if not folder.is_dir():
        raise ArtifactError(f"{report_dir} holds no {PREDICTIONS}/ folder; is it an idia-engine report?")
    mode = "r" if mmap else None
    with open(folder / "images.csv", newline="", encoding="utf-8") as f:
        images = list(csv.DictReader(f))
    candidates = (folder / "candidates.txt").read_text(encoding="utf-8").split("\n")[:-1]
    return Predictions(np.load(folder / "topk_ids.npy", mmap_mode=mode),
                       np.load(folder / "topk_scores.npy", mmap_mode=mode), images, candidates)


def build_summary(config, index, model, store_dir, collection, persons, images_used, rows, skipped,
                  extra_names, votes, decisions, metrics, label_info, k) -> dict:
    """summary.json: a function of the inputs and arguments alone (what varies per run goes to run.json)."""
    has_images = images_used > 0
    requested = config.images_per_person
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "artifact": REPORT_ARTIFACT,
        "mode": "paper",
        "parameters": {
            "source": collection.source, "index_dir": str(config.index_dir), "store_dir": str(store_dir),
            "labels_file": str(config.labels_file) if config.labels_file else None,
            "top_k": config.top_k, "tau": config.tau, "images_per_person": requested, "seed": config.seed,
            "strict": config.strict, "device": str(model.device), "precision": model.precision.value,
            "batch_size": config.batch_size, "workers": config.workers, "store_dtype": config.store_dtype,
        },
        "index": {"build_id": index.manifest.build_id, "index_kind": index.manifest.index_kind,
                  "num_names": index.manifest.num_names, "num_templates": index.manifest.num_templates,
                  "names_sha256": index.manifest.names_sha256},
        "model": {"model": model.info.model, "pretrained": model.info.pretrained,
                  "weights_source": model.info.weights_source, "fingerprint": model.info.fingerprint},
        "counts": {
            "persons": len(persons),
            "persons_with_images": int(has_images.sum()),
            "images_found": sum(len(v) for v in collection.persons.values()),
            "images_used": len(rows),
            "images_skipped": len(skipped),
            "candidates": len(index.names) + len(extra_names),
            "candidates_added_for_this_run": len(extra_names),
            "top_k": k,
            "persons_below_requested_images": int((images_used < requested).sum()) if requested else 0,
            "decided_member": int((decisions & has_images).sum()),
            "decided_non_member": int((~decisions & has_images).sum()),
        },
        "candidates_added_for_this_run": extra_names,
        "persons_without_images": [p for p, n in zip(persons, images_used) if n == 0],
        "skipped_files": [asdict(s) for s in sorted(skipped, key=lambda s: s.path)],
        "metrics": metrics,
        "labels": label_info,
        "files": FILE_DESCRIPTIONS,
        "library_versions": library_versions(),
    }
