"""`labels`: membership ground truth from training captions, as the paper made it (exact search for each
name in the captions, never kNN similarity).

For every candidate name: the number of captions that contain it as whole words (matcher.py). Output:
labels CSV `name,member,occurrences` (member iff occurrences >= min_occurrences), readable by `query
--labels` and `evaluate`, and beside it `<stem>.manifest.json` (inputs with sizes and SHA-256, rows read,
matcher settings, names nested in other names, backend, timings).

Resumable per input file: each finished file's counts go to `.<labels file name>.parts/`, keyed by the
file's SHA-256, the caption column, the matcher settings and the names; a rerun reuses them and counts
only the rest. The counts are sums over files and pieces, so the result is identical however the work
was split (workers, Ray, a resumed run). The parts folder is removed once the labels are written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..candidates.names_file import read_names
from ..disk.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from ..disk.versions import library_versions, utc_now
from ..errors import InputError
from ..progress import Progress, no_progress
from ..ray_cluster import check_ray_address
from .captions import CaptionFile, Piece, expand_inputs, pieces_of, resolve_file
from .matcher import nested_names
from .workers import PieceCount, count_locally, count_on_ray, default_workers

log = logging.getLogger(__name__)

LABELS_ARTIFACT = "idia-engine caption labels"
LABELS_SCHEMA_VERSION = 1
NORMALISATION = "NFC, whitespace runs to one space, stripped; case-folded unless case-sensitive"


@dataclass(frozen=True)
class CaptionLabelsConfig:
    """Everything `count_caption_labels` needs."""

    inputs: tuple[Path, ...]  # caption files (.parquet, .txt, .tsv) or folders of them
    names_file: Path  # the candidate names (a names file as build-index reads it)
    out: Path = Path("labels.csv")  # the labels CSV; the manifest goes beside it
    column: str | None = None  # the caption column; None = the first of caption, TEXT, text present
    case_sensitive: bool = False  # match names with their case (default: case-folded)
    min_occurrences: int = 1  # member iff a name is in at least this many captions
    workers: int = 0  # processes (or Ray CPUs with ray="local"); 0 = every CPU of this machine
    ray: str | None = None  # a Ray cluster address (host:port, ray://host:port, "auto", "local"); None = no Ray
    batch_rows: int = 65536  # captions per batch handed to the matcher

    def __post_init__(self) -> None:
        if not self.inputs:
            raise InputError("no caption input given; give Parquet, text or TSV files or folders of them")
        if self.min_occurrences < 1:
            raise InputError(f"--min-occurrences must be >= 1, got {self.min_occurrences}")
        if self.workers < 0:
            raise InputError(f"--workers must be >= 0 (0 = every CPU), got {self.workers}")
        if self.batch_rows < 1:
            raise InputError(f"batch rows must be >= 1, got {self.batch_rows}")
        if Path(self.out).is_dir():
            raise InputError(f"-o {self.out} is a directory; give the path of the labels CSV to write")

    @property
    def manifest_path(self) -> Path:
        return Path(self.out).with_name(Path(self.out).stem + ".manifest.json")

    @property
    def parts_dir(self) -> Path:
        return Path(self.out).with_name(f".{Path(self.out).name}.parts")


@dataclass(frozen=True)
class CaptionLabelsResult:
    labels_path: Path  # the CSV written
    manifest: dict  # what the manifest holds
    counts: dict[str, int] = field(default_factory=dict)  # name -> captions containing it


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _part_key(file: CaptionFile, sha: str, names_sha: str, config: CaptionLabelsConfig) -> str:
    settings = json.dumps([sha, file.kind, file.column, config.case_sensitive, names_sha, LABELS_SCHEMA_VERSION])
    return hashlib.sha256(settings.encode()).hexdigest()[:32]


def _save_part(path: Path, count: PieceCount) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, counts=count.counts, totals=np.array([count.rows, count.empty, count.invalid_utf8], np.int64))
    write_bytes_atomic(path, buffer.getvalue())


def _load_part(path: Path, n_names: int) -> PieceCount | None:
    try:
        with np.load(path) as data:
            counts, totals = data["counts"], data["totals"]
    except (OSError, ValueError, KeyError):
        return None  # a damaged part is counted again
    if counts.shape != (n_names,):
        return None
    return PieceCount(counts.astype(np.int64), int(totals[0]), int(totals[1]), int(totals[2]))


def count_caption_labels(config: CaptionLabelsConfig, progress: Progress = no_progress) -> CaptionLabelsResult:
    """Count every name in the captions and write the labels CSV and its manifest (see the module docstring)."""
    started = time.perf_counter()
    if config.ray:
        check_ray_address(config.ray)  # before any work: an unreachable cluster is one line, nothing written
    names = read_names(config.names_file).names
    names_sha = hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()
    paths = expand_inputs(list(config.inputs))
    files = [resolve_file(p, config.column) for p in paths]
    progress("hash caption files", 0, len(files))
    shas = []
    for i, f in enumerate(files):
        shas.append(_sha256(f.path))
        progress("hash caption files", i + 1, len(files))
    part_path = {f.path: config.parts_dir / f"{_part_key(f, sha, names_sha, config)}.npz" for f, sha in zip(files, shas)}

    per_file: dict[Path, PieceCount] = {}
    for f in files:
        loaded = _load_part(part_path[f.path], len(names)) if part_path[f.path].is_file() else None
        if loaded is not None:
            per_file[f.path] = loaded
    reused = set(per_file)
    todo = [f for f in files if f.path not in per_file]
    workers = config.workers or default_workers()
    if config.ray:
        pieces = [Piece(f, None) for f in todo]  # Ray Data splits a Parquet file into blocks itself
        results = count_on_ray(pieces, names, config.case_sensitive, config.ray, workers, config.batch_rows)
    else:
        pieces = [p for f in todo for p in pieces_of(f)]
        results = count_locally(pieces, names, config.case_sensitive, workers, config.batch_rows)
    remaining = Counter(p.file.path for p in pieces)  # pieces of each file still to count
    partial: dict[Path, PieceCount] = {}
    progress("count names in captions", 0, len(pieces))
    for done, (piece, count) in enumerate(results, 1):
        path = piece.file.path
        acc = partial.setdefault(path, PieceCount(np.zeros(len(names), np.int64), 0, 0, 0))
        acc.counts += count.counts
        acc.rows, acc.empty, acc.invalid_utf8 = acc.rows + count.rows, acc.empty + count.empty, \
            acc.invalid_utf8 + count.invalid_utf8
        remaining[path] -= 1
        if remaining[path] == 0:  # the file is complete: its part makes a rerun skip it
            _save_part(part_path[path], acc)
            per_file[path] = partial.pop(path)
        progress("count names in captions", done, len(pieces))

    totals = np.zeros(len(names), np.int64)
    for count in per_file.values():
        totals += count.counts
    rows = sum(c.rows for c in per_file.values())
    seconds = time.perf_counter() - started
    nested = nested_names(names, config.case_sensitive)
    members = totals >= config.min_occurrences
    lines = ["name,member,occurrences"] + [f"{_csv_field(n)},{int(m)},{int(c)}" for n, m, c in zip(names, members, totals)]
    manifest = {
        "schema_version": LABELS_SCHEMA_VERSION, "artifact": LABELS_ARTIFACT, "created_at": utc_now(),
        "labels_file": str(config.out),
        "names": {"file": str(config.names_file), "count": len(names), "sha256": names_sha},
        "inputs": [{"path": str(f.path), "kind": f.kind, "column": f.column or ("0 (no header)" if f.kind == "tsv" else
                                                                                None),
                    "bytes": f.path.stat().st_size, "sha256": sha, "rows": per_file[f.path].rows,
                    "empty_rows": per_file[f.path].empty, "invalid_utf8_rows": per_file[f.path].invalid_utf8,
                    "reused_from_earlier_run": f.path in reused} for f, sha in zip(files, shas)],
        "rows_read": rows,
        "matcher": {"kind": "Aho-Corasick (pyahocorasick), whole words", "normalisation": NORMALISATION,
                    "case_sensitive": config.case_sensitive, "word_characters": "letters, digits, underscore",
                    "counts": "captions containing the name at least once",
                    "min_occurrences": config.min_occurrences},
        "members": int(members.sum()), "non_members": int((~members).sum()),
        "nested_names": {"note": "every caption of the longer name also counts for the shorter one",
                         "pairs": [list(p) for p in nested], "listed": len(nested)},
        "backend": {"kind": "ray", "address": config.ray, "cpus": workers} if config.ray else
                   {"kind": "processes", "workers": workers},
        "timings": {"seconds": seconds, "captions_per_s": rows / seconds if seconds > 0 else None,
                    "captions_counted_now": sum(per_file[p].rows for p in per_file if p not in reused)},
        "library_versions": library_versions(),
    }
    write_text_atomic(Path(config.out), "\n".join(lines) + "\n")
    write_json_atomic(config.manifest_path, manifest)
    shutil.rmtree(config.parts_dir, ignore_errors=True)
    return CaptionLabelsResult(Path(config.out), manifest, dict(zip(names, totals.tolist())))


def _csv_field(text: str) -> str:
    """A CSV cell: quoted when it holds a comma, quote or line break."""
    if any(ch in text for ch in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text
