"""`idia-engine export`: a built index's prompt embeddings, and the photo embeddings of its store, in
clip-retrieval's layout, so that embedding-reader, autofaiss or clip-retrieval's back end can read them.

    OUT/
      idia_export.json                 # the model behind every row (name, weights, fingerprint, dim, dtype,
                                       # precision), the index, the row order, every file with its size
      names/text_emb/text_emb_K.npy    # every (template, name) prompt: row t * N + i = template t, name i
      names/metadata/metadata_K.parquet    # template_id, template, name_id, name, prompt, model_fingerprint
      images/img_emb/img_emb_K.npy     # the store's photo embeddings (with a store, or a report)
      images/metadata/metadata_K.parquet   # sha256, image_path, name, model_fingerprint

Each of names/ and images/ is one folder of the layout (embeddings beside their row-aligned metadata),
since the prompts and the photos are not row-aligned with each other. Prompt rows are the rows the index
stores (`NameIndex.stored_rows`: the vectors file, the flat index or the dense matrix), never encoded
again. Photo rows come from the LMDB store, which is keyed by content hash alone: with `--report`, the
report's photos in its row order, with their paths and persons (so that `query --embeddings` on the
export reproduces the report); without, every embedding the store holds of the index's model at the
given precision, sha256 only. Each Parquet file also carries the model as JSON in its schema metadata
(key `idia_export`). The folder is staged and swapped in whole; an existing OUT is replaced only if it is
an earlier export whose every file its sidecar lists.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..candidates.templates import render
from ..disk.atomic import check_output_placement, check_replaceable_output, staged_directory, write_json_atomic
from ..disk.space import require_free_space
from ..disk.textfiles import check_whole_number, read_artifact_json
from ..disk.versions import library_versions, utc_now
from ..errors import InputError
from ..index.layout import DEFAULT_STORE_NAME
from ..index.reader import NameIndex, open_index
from ..model.load import ModelInfo, Precision
from ..progress import Progress, no_progress
from ..query.report import PREDICTIONS, REPORT_ARTIFACT, REPORT_SCHEMA_VERSION, SUMMARY
from ..query.run import image_fingerprint_of
from ..query.store import EmbeddingStore, Namespace
from .clip_retrieval import (
    DTYPES,
    EXPORT_ARTIFACT,
    EXPORT_IMAGES,
    EXPORT_NAMES,
    EXPORT_SIDECAR,
    FINGERPRINT_COLUMN,
    IMAGE_EMBEDDINGS,
    TEXT_EMBEDDINGS,
    ShardWriter,
)

log = logging.getLogger(__name__)

EXPORT_SCHEMA_VERSION = 1
DEFAULT_ROWS_PER_FILE = 1_000_000
MAX_ROWS_PER_FILE = 1 << 26  # a shard of 2^26 rows of 4096 floats is 1 TiB: beyond, a mistyped number
_CHUNK = 65536  # rows read and written at once
_PARQUET_KEY = b"idia_export"  # the model, as JSON, in every Parquet file's schema metadata


@dataclass(frozen=True)
class ExportConfig:
    """What `export_embeddings` writes; checked when made."""

    index_dir: Path  # an index built by build-index
    out_dir: Path  # the export folder (an earlier export there is replaced)
    store_dir: Path | None = None  # image-embedding store; None: the report's, else <index_dir>/image-store if any
    report_dir: Path | None = None  # a query report: its photos (paths, persons) are exported, in its order
    rows_per_file: int = DEFAULT_ROWS_PER_FILE  # rows per shard (the last shard of each folder holds the rest)
    dtype: str = "float32"  # of the .npy shards: float32 (the rows exactly) or float16 (half the size)
    precision: Precision = Precision.FP32  # without a report: whose image embeddings (the store keeps each apart)

    def __post_init__(self) -> None:
        check_whole_number("--rows-per-file", self.rows_per_file, 1, MAX_ROWS_PER_FILE, "rows of one shard")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype must be float32 or float16, got {self.dtype!r}")
        Precision(self.precision)
        inputs = [("index dir", self.index_dir), ("embedding store", self.store_dir), ("report", self.report_dir)]
        check_output_placement(Path(self.out_dir), "--out", inputs)


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    sidecar: dict  # what idia_export.json holds


@dataclass(frozen=True)
class _ImagePlan:
    """The photo rows to export: where from, which namespace, and each row's (sha256, path, person)."""

    store: Path
    ns: Namespace
    precision: str
    report: Path | None
    rows: list[tuple[str, str | None, str | None]]


def export_embeddings(config: ExportConfig, progress: Progress = no_progress) -> ExportResult:
    """Write the export; see the module docstring. Everything is checked before anything is written."""
    check_replaceable_output(config.out_dir, EXPORT_SIDECAR, EXPORT_ARTIFACT, "export")
    with open_index(config.index_dir) as index:
        info = index.manifest.model_info
        plan = _plan_images(config, index, info)
        n_prompts = index.num_templates * len(index.names)
        width = DTYPES[config.dtype].itemsize
        photos = len(plan.rows) if plan else 0
        require_free_space(Path(config.out_dir).parent,
                           (n_prompts + photos) * info.embed_dim * width + n_prompts * 200 + photos * 300, "the export")
        with staged_directory(Path(config.out_dir), replace_existing=True) as tmp:
            names = _write_names(tmp / EXPORT_NAMES, index, info, config, progress)
            images = None
            if plan is not None:
                with EmbeddingStore(plan.store, readonly=True) as store:
                    images = _write_images(tmp / EXPORT_IMAGES, store, plan, info, config, progress)
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            sidecar = {
                "schema_version": EXPORT_SCHEMA_VERSION, "artifact": EXPORT_ARTIFACT, "created_at": utc_now(),
                "layout": "clip-retrieval: <folder>/<kind>/<kind>_K.npy beside <folder>/metadata/metadata_K.parquet, "
                          "shard K row-aligned with metadata shard K; read with embedding-reader "
                          "(file_format='parquet_npy')",
                "index": {"index_dir": str(config.index_dir), "build_id": index.manifest.build_id,
                          "index_kind": index.manifest.index_kind, "num_names": len(index.names),
                          "num_templates": index.num_templates, "names_sha256": index.manifest.names_sha256,
                          "templates": list(index.templates)},
                "names": names, "images": images,
                "verified": "names: rows the index stores, written as they are (float16: rounded); images: rows "
                            "the store holds, computed by idia-engine from the photos' bytes",
                "files": files, "library_versions": library_versions(),
            }
            write_json_atomic(tmp / EXPORT_SIDECAR, sidecar)
    return ExportResult(Path(config.out_dir), sidecar)


def _model_section(info: ModelInfo, dtype: str, precision: str) -> dict:
    return {"model": info.model, "pretrained": info.pretrained, "open_clip_name": info.open_clip_name,
            "fingerprint": info.fingerprint, "embed_dim": info.embed_dim, "dtype": dtype, "precision": precision}


def _schema(fields: list[tuple[str, pa.DataType]], model: dict) -> pa.Schema:
    return pa.schema(fields + [(FINGERPRINT_COLUMN, pa.string())],
                     metadata={_PARQUET_KEY: json.dumps(model, sort_keys=True).encode()})


def _write_names(folder: Path, index: NameIndex, info: ModelInfo, config: ExportConfig, progress: Progress) -> dict:
    """names/: every (template, name) prompt's stored embedding, template-major."""
    precision = str(index.manifest.encode.get("precision", "fp32"))
    model = _model_section(info, config.dtype, precision)
    schema = _schema([("template_id", pa.int32()), ("template", pa.string()), ("name_id", pa.int32()),
                      ("name", pa.string()), ("prompt", pa.string())], model)
    n, n_templates = len(index.names), index.num_templates
    writer = ShardWriter(folder, TEXT_EMBEDDINGS, n * n_templates, info.embed_dim, config.rows_per_file,
                         config.dtype, schema)
    progress("export names", 0, n * n_templates)
    for t, template in enumerate(index.templates):
        rows = index.stored_rows(t)
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            names = index.names[start:stop]
            meta = pa.table({"template_id": pa.array(np.full(stop - start, t, np.int32)),
                             "template": pa.array([template] * (stop - start), pa.string()),
                             "name_id": pa.array(np.arange(start, stop, dtype=np.int32)),
                             "name": pa.array(names, pa.string()),
                             "prompt": pa.array([render(template, name) for name in names], pa.string()),
                             FINGERPRINT_COLUMN: pa.array([info.fingerprint] * (stop - start), pa.string())})
            writer.add(np.asarray(rows[start:stop]), meta)
            progress("export names", t * n + stop, n * n_templates)
        del rows
    writer.close()
    return {"folder": EXPORT_NAMES, "embeddings": TEXT_EMBEDDINGS, "rows": n * n_templates,
            "rows_per_file": config.rows_per_file, "shards": len(writer.files) // 2,
            "row_order": "template-major: row t * num_names + i is template t with name i (template_id, name_id)",
            "columns": list(schema.names), "model": model}


def _plan_images(config: ExportConfig, index: NameIndex, info: ModelInfo) -> _ImagePlan | None:
    """Which photo embeddings to export (None: none, when no store was named and the index has none)."""
    report_rows, precision, store_dir = None, Precision(config.precision).value, config.store_dir
    if config.report_dir is not None:
        summary = read_artifact_json(Path(config.report_dir) / SUMMARY, REPORT_ARTIFACT, REPORT_SCHEMA_VERSION,
                                     "give a report written by idia-engine query")
        fingerprint = (summary.get("model") or {}).get("fingerprint")
        if fingerprint != info.fingerprint:
            raise InputError(f"--report {config.report_dir} was made with model fingerprint {str(fingerprint)[:12]}, "
                             f"index {config.index_dir} with {info.fingerprint[:12]}; give a report of this index's "
                             "model")
        parameters = summary.get("parameters") or {}
        if not isinstance(parameters.get("precision"), str):
            raise InputError(f"--report {config.report_dir}: its summary.json records no precision; rerun query")
        precision = parameters["precision"]
        if store_dir is None and isinstance(parameters.get("store_dir"), str):
            store_dir = Path(parameters["store_dir"])
        report_rows = _report_images(Path(config.report_dir))
    explicit = store_dir is not None
    store_dir = Path(store_dir) if explicit else Path(config.index_dir) / DEFAULT_STORE_NAME
    if not store_dir.is_dir():
        if explicit:
            raise InputError(f"--store {store_dir} does not exist; give the store the photos were embedded into")
        log.info("index %s has no image store: exporting the name embeddings only", config.index_dir)
        return None
    with EmbeddingStore(store_dir, readonly=True) as store:
        ns = store.recorded_namespace(image_fingerprint_of(info.fingerprint, precision))
        if ns is None:
            if not explicit and config.report_dir is None:
                log.info("store %s holds no %s image embeddings of the index's model: exporting the name "
                         "embeddings only", store_dir, precision)
                return None
            raise InputError(f"store {store_dir} holds no image embeddings of model {info.model} "
                             f"({info.fingerprint[:12]}) at precision {precision}; give the store and precision "
                             "query used")
        if report_rows is None:
            return _ImagePlan(store_dir, ns, precision, None, [(sha, None, None) for sha in store.shas(ns)])
        held = store.contains(ns, [sha for sha, _, _ in report_rows])
    if not held.all():
        sha, path, _ = report_rows[int(np.flatnonzero(~held)[0])]
        raise InputError(f"store {store_dir} has no embedding of {int((~held).sum())} of the photos of report "
                         f"{config.report_dir} (e.g. {path}); give the store that query used (--store)")
    return _ImagePlan(store_dir, ns, precision, Path(config.report_dir), report_rows)


def _report_images(report: Path) -> list[tuple[str, str, str]]:
    """(sha256, path, person) of every photo of a report, in its row order (predictions/images.csv)."""
    path = report / PREDICTIONS / "images.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"--report: {path} cannot be read ({e}); give a report written by idia-engine query"
                         ) from None
    out = []
    for i, row in enumerate(rows):
        sha = row.get("sha256") or ""
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha) or not row.get("name"):
            raise InputError(f"--report: {path} row {i} has no person or no sha256 (64 hex digits); give a report "
                             "written by idia-engine query")
        out.append((sha, row.get("path") or None, row["name"]))
    return out


def _write_images(folder: Path, store: EmbeddingStore, plan: _ImagePlan, info: ModelInfo, config: ExportConfig,
                  progress: Progress) -> dict:
    """images/: the planned photo embeddings, read back from the store in bounded chunks."""
    model = {**_model_section(info, config.dtype, plan.precision), "store_namespace": plan.ns.fingerprint,
             "store_dtype": plan.ns.dtype}
    schema = _schema([("sha256", pa.string()), ("image_path", pa.string()), ("name", pa.string())], model)
    writer = ShardWriter(folder, IMAGE_EMBEDDINGS, len(plan.rows), info.embed_dim, config.rows_per_file,
                         config.dtype, schema)
    shas = [sha for sha, _, _ in plan.rows]
    progress("export images", 0, len(shas))
    for start, emb in store.iter_embeddings(plan.ns, shas, _CHUNK):
        part = plan.rows[start:start + len(emb)]
        meta = pa.table({"sha256": pa.array([r[0] for r in part], pa.string()),
                         "image_path": pa.array([r[1] for r in part], pa.string()),
                         "name": pa.array([r[2] for r in part], pa.string()),
                         FINGERPRINT_COLUMN: pa.array([info.fingerprint] * len(part), pa.string())})
        writer.add(emb, meta)
        progress("export images", start + len(emb), len(shas))
    writer.close()
    return {"folder": EXPORT_IMAGES, "embeddings": IMAGE_EMBEDDINGS, "rows": len(plan.rows),
            "rows_per_file": config.rows_per_file, "shards": len(writer.files) // 2,
            "source": {"store": str(plan.store), "report": str(plan.report) if plan.report else None},
            "row_order": ("the report's photos in its row order (predictions/images.csv)" if plan.report else
                          "the store's key order (sha256); paths and persons unknown: the store is keyed by "
                          "content alone"),
            "columns": list(schema.names), "model": model}
