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
        topk.csv                 # the same top-k as a table: one row per (photo, template, rank)
        topk.parquet             # that table in Parquet (same rows, typed columns)

The whole directory is staged under a temporary name and swapped in at the end, so a reader never sees
a half-written report. Everything but run.json is byte-identical for the same inputs and arguments, also
when an earlier run of it was killed halfway (topk.parquet too: Parquet records no timestamps, and its row
groups are cut at a fixed number of photos).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..disk.atomic import check_only_own_files, write_json_atomic
from ..disk.versions import library_versions
from ..errors import ArtifactError, ArtifactExistsError, InputError
from .votes import NO_MODE, PaperModeVotes

REPORT_SCHEMA_VERSION = 1
REPORT_ARTIFACT = "idia-engine attack report"
SUMMARY = "summary.json"
RUN = "run.json"
PREDICTIONS = "predictions"
TOP1_STATUS = "top1_status.npy"
TOPK_CSV = "topk.csv"
TOPK_PARQUET = "topk.parquet"
# Columns of topk.csv / topk.parquet, in order, with their Parquet types; one row per (photo, template, rank),
# photos in images.csv order, then templates, then ranks: row r is topk_ids.npy's element r in C order.
TOPK_SCHEMA = pa.schema([("photo", pa.string()), ("person", pa.string()), ("template", pa.int32()),
                         ("template_text", pa.string()), ("rank", pa.int32()), ("name", pa.string()),
                         ("cosine", pa.float32()), ("status", pa.int8())])
TOPK_COLUMNS = tuple(TOPK_SCHEMA.names)
# Table rows built at once (the photos per chunk follow from templates x k). A constant, so that Parquet's
# row groups, and with them the file's bytes, depend on the inputs alone.
TOPK_CHUNK_ROWS = 1 << 16

FILE_DESCRIPTIONS = {
    "summary.json": "parameters, counts, skipped files, duplicate photos dropped (the same bytes twice for one "
                    "person: one photo, one vote) and (with labels) metrics; identical for identical inputs",
    "run.json": "this run only: created_at, the command line (when run from the CLI), timings per stage, images "
                "encoded now / found in the store",
    "persons.csv": "one row per person: name, n_images, score (0..T templates whose unique plurality is the "
                   "true name; higher = more likely a member), decision, label, in_index, true_votes, "
                   "tied_templates, hits (one 0/1 per template, in template order, separated by spaces: "
                   "'0 1 0 ...')",
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
    "predictions/topk.csv": "the top-k as a table, one row per (photo, template, rank) in the order of "
                            "topk_ids.npy's elements: photo (path as in images.csv), person, template (index, "
                            "as in modes.csv), template_text, rank (1 = best), name, cosine (the float32 of "
                            "topk_scores.npy, written to round-trip), status (top1_status.npy's code on rank 1, "
                            "empty on the other ranks)",
    "predictions/topk.parquet": "the rows and columns of topk.csv, typed: strings; template and rank int32, "
                                "cosine float32, status int8 (null below rank 1)",
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
            earlier = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if isinstance(earlier, dict) and earlier.get("artifact") == REPORT_ARTIFACT:
            check_only_own_files(out_dir, _files_of_report(out_dir, earlier), "--out", "report or its evaluation")
            return
    if any(out_dir.iterdir()):
        raise ArtifactExistsError(f"--out {out_dir} is not empty and is not an idia-engine report; choose another --out")


def _files_of_report(out_dir: Path, summary: dict) -> set[str]:
    """Every file an earlier report lists as its own (relative POSIX paths): its summary's file table, run.json,
    and the evaluation `evaluate` wrote into it (the files summary.json lists under "evaluation")."""
    files = summary.get("files") if isinstance(summary.get("files"), dict) else {}
    own = {SUMMARY, RUN, *FILE_DESCRIPTIONS, *files}
    evaluation = summary.get("evaluation")
    if isinstance(evaluation, dict):
        own |= {f for f in evaluation.get("files") or [] if isinstance(f, str)}
        if isinstance(evaluation.get("metrics"), str):
            own.add(evaluation["metrics"])
    return own


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
                    hits_cell(votes.hits[p])]
            w.writerow(row)


def hits_cell(hits: np.ndarray) -> str:
    """persons.csv's `hits`: one 0/1 per template, in template order, separated by spaces ("0 1 0 0 ...").

    Not a bare run of digits ("0100..."), which a spreadsheet takes for a number and strips of its leading
    zeros; nor template numbers joined by ";" ("2;5"), which spreadsheets whose locale lists with ";" split
    into cells, and whose single hit ("5") still reads as a number. Digits with spaces between them are a
    number in no locale (no thousands grouping has one-digit groups), keep position t = template t (as in
    modes.csv), and `cell.split()` reads them back. (With a single template the cell is "0" or "1": a
    number, but one that loses nothing.)
    """
    return " ".join("1" if h else "0" for h in hits)


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


def write_topk_tables(pred_dir: Path, images: list[tuple[str, str]], candidates: list[str],
                      templates: list[str]) -> None:
    """predictions/topk.csv and topk.parquet from the topk_ids/topk_scores/top1_status.npy already in
    `pred_dir` (read memory-mapped); `images` = (person, path) per image row, as in images.csv.

    Streamed in chunks of whole photos (about TOPK_CHUNK_ROWS rows each), so 10^5 photos x 21 templates x
    k = 10 never exist as Python objects at once: a chunk is numpy index arithmetic, its strings are taken
    from the existing ones, and it becomes one Arrow table: one Parquet row group and one batch of CSV rows.
    """
    ids = np.load(pred_dir / "topk_ids.npy", mmap_mode="r")
    scores = np.load(pred_dir / "topk_scores.npy", mmap_mode="r")
    status = np.load(pred_dir / TOP1_STATUS, mmap_mode="r")
    n_images, n_templates, k = ids.shape
    strings = _TopkStrings(
        photos=np.array([path for _, path in images], object),
        persons=np.array([person for person, _ in images], object),
        templates=np.array(templates, object))
    photos_per_chunk = max(1, TOPK_CHUNK_ROWS // (n_templates * k))
    # Arrow's CSV writer (C++) writes the same chunks ~10x faster than the csv module, and a float32 as its
    # shortest repr that reads back as the same float32; a null (status below rank 1) is an empty cell.
    with open(pred_dir / TOPK_CSV, "wb") as f, \
            pq.ParquetWriter(pred_dir / TOPK_PARQUET, TOPK_SCHEMA, compression="snappy") as parquet:
        f.write((",".join(TOPK_COLUMNS) + "\n").encode("utf-8"))  # Arrow would quote every header name
        table_csv = pacsv.CSVWriter(f, TOPK_SCHEMA, write_options=pacsv.WriteOptions(include_header=False))
        for start in range(0, n_images, photos_per_chunk):
            chunk = _TopkChunk.of(start, min(start + photos_per_chunk, n_images), ids, scores, status, candidates)
            table = chunk.table(strings)
            parquet.write_table(table)
            table_csv.write_table(table)
        table_csv.close()


@dataclass(frozen=True)
class _TopkStrings:
    """The strings the table's rows repeat, as object arrays (indexing them copies references, not text)."""

    photos: np.ndarray  # object [M]: image paths as in images.csv
    persons: np.ndarray  # object [M]: the person of each image
    templates: np.ndarray  # object [T]: template texts, verbatim with {0}


@dataclass(frozen=True)
class _TopkChunk:
    """The table rows of image rows [start, stop): photo-major, then template, then rank (C order of
    topk_ids.npy)."""

    image_row: np.ndarray  # int64 [R]: the row of images.csv
    template: np.ndarray  # int32 [R]: template index
    rank: np.ndarray  # int32 [R]: 1 = best
    names: np.ndarray  # object [R]: candidate names
    cosine: np.ndarray  # float32 [R]: topk_scores.npy's values
    status: np.ndarray  # int8 [R]: top1_status.npy's code; meaningful on rank 1 only

    @classmethod
    def of(cls, start: int, stop: int, ids: np.ndarray, scores: np.ndarray, status: np.ndarray,
           candidates: list[str]) -> _TopkChunk:
        n, (_, n_templates, k) = stop - start, ids.shape
        # Only the chunk's distinct candidates are looked up, not all N names turned into an array.
        distinct, which = np.unique(np.asarray(ids[start:stop]).reshape(-1), return_inverse=True)
        top1_status = np.zeros(n * n_templates * k, np.int8)
        top1_status[::k] = np.asarray(status[start:stop]).reshape(-1)
        return cls(image_row=np.repeat(np.arange(start, stop), n_templates * k),
                   template=np.tile(np.repeat(np.arange(n_templates, dtype=np.int32), k), n),
                   rank=np.tile(np.arange(1, k + 1, dtype=np.int32), n * n_templates),
                   names=np.array([candidates[i] for i in distinct], object)[which.reshape(-1)],
                   cosine=np.ascontiguousarray(scores[start:stop]).reshape(-1), status=top1_status)

    def table(self, strings: _TopkStrings) -> pa.Table:
        """The chunk's rows for Parquet: strings as Arrow strings, status null below rank 1."""
        return pa.Table.from_arrays(
            [pa.array(strings.photos[self.image_row], pa.string()),
             pa.array(strings.persons[self.image_row], pa.string()), pa.array(self.template),
             pa.array(strings.templates[self.template], pa.string()), pa.array(self.rank),
             pa.array(self.names, pa.string()), pa.array(self.cosine),
             pa.array(self.status, mask=self.rank != 1)],
            schema=TOPK_SCHEMA)


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
                  extra_names, votes, decisions, metrics, label_info, k, *, duplicates=(), shared=(),
                  same_tokens=None, added_prompt_lengths=None) -> dict:
    """summary.json: a function of the inputs and arguments alone (what varies per run goes to run.json).

    `duplicates`: the files left out as copies of another photo of the same person (person, kept, dropped,
    sha256); `shared`: the photos found under several persons (sha256, persons, paths), all of them used;
    `same_tokens`: person -> the index name it was matched to by token ids (spelt otherwise);
    `added_prompt_lengths`: build-index's prompt-length check run on `extra_names` (None when none)."""
    same_tokens = same_tokens or {}
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
                  "names_sha256": index.manifest.names_sha256,
                  "templates": list(index.templates)},  # verbatim: the report page's model card shows them
        "model": {"model": model.info.model, "pretrained": model.info.pretrained,
                  "weights_source": model.info.weights_source, "fingerprint": model.info.fingerprint},
        "counts": {
            "persons": len(persons),
            "persons_with_images": int(has_images.sum()),
            "images_found": sum(len(v) for v in collection.persons.values()),
            "images_used": len(rows),
            "images_skipped": len(skipped),
            "duplicate_photos_dropped": len(duplicates),
            "photos_shared_between_persons": len(shared),
            "candidates": len(index.names) + len(extra_names),
            "candidates_added_for_this_run": len(extra_names),
            "persons_matched_by_tokens": len(same_tokens),
            "top_k": k,
            "persons_below_requested_images": int((images_used < requested).sum()) if requested else 0,
            "decided_member": int((decisions & has_images).sum()),
            "decided_non_member": int((~decisions & has_images).sum()),
        },
        "candidates_added_for_this_run": extra_names,
        "added_names_prompt_lengths": added_prompt_lengths,
        "persons_matched_by_tokens": [{"person": p, "index_name": n} for p, n in same_tokens.items()],
        "persons_without_images": [p for p, n in zip(persons, images_used) if n == 0],
        "skipped_files": [asdict(s) for s in sorted(skipped, key=lambda s: s.path)],
        "duplicate_photos": [asdict(d) for d in duplicates],  # per person in listing order
        "photos_shared_between_persons": [asdict(s) for s in shared],
        "metrics": metrics,
        "labels": label_info,
        "files": FILE_DESCRIPTIONS,
        "library_versions": library_versions(),
    }
