"""The name index on disk: what `build-index` writes and `query` reads.

Layout of an index directory:

    idx/
      manifest.json            # IndexManifest; written last, atomically: it *is* the commit point
      data-<build_id>/         # everything the manifest refers to
        names.txt              # the name table: row i of every template index is names[i]
        template_00.faiss ...  # one backend index per template, rows = names, L2-normalised
                               # (+ template_00.faiss.json for faiss factory-string kinds)
        vectors_00.npy ...     # raw float32 embeddings [N, D] per template: the ground truth that exact
                               # re-ranking and the fallback read (kept only for approximate kinds)
      .build-<key>/            # an unfinished build: resumed by the same command, removed by a finished one
      image-store/             # the default LMDB embedding store of `query` (survives rebuilds)

A build streams: each template's prompts are encoded in batches and appended to its vectors file;
every few batches the file is flushed and `progress.json` records the rows on disk, so an interrupted
build resumes where it stopped (the key of the build directory is a hash of everything that determines
the result: names, templates, model fingerprint, precision, index kind, batch size). Then the
template's index is trained on a seeded sample of its rows and filled in chunks. Memory stays bounded
by one template's index plus one chunk. At the end the build directory is renamed to `data-<build_id>`
and `manifest.json` is replaced. A crash at any point leaves the previous index (or none) loadable and
never a half-written one. A reader that has opened the manifest keeps seeing one whole build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from idia_engine.indexes import NameIndexBackend, get_backend

from .atomic import TMP_MARK, write_bytes_atomic, write_json_atomic
from .errors import (
    ArtifactError,
    ArtifactExistsError,
    IdiaError,
    InputError,
    ManifestMismatchError,
)
from .model import (
    DeviceChoice,
    LoadedModel,
    ModelInfo,
    ModelSpec,
    Precision,
    load_model,
)
from .names import read_names
from .progress import Progress, no_progress
from .templates import PAPER_TEMPLATES, render
from .textfiles import read_artifact_json
from .versions import library_versions, utc_now

log = logging.getLogger(__name__)

INDEX_SCHEMA_VERSION = 1
INDEX_ARTIFACT = "idia-engine name index"
MANIFEST_NAME = "manifest.json"
NAMES_FILE = "names.txt"
DEFAULT_STORE_NAME = "image-store"
BUILD_PREFIX = ".build-"  # an unfinished, resumable build
PROGRESS_FILE = "progress.json"
ENSEMBLE_KIND = "ensemble"  # not a per-template backend: one search over name means, exact re-rank per template
ENSEMBLE_DIR = "ensemble"

@dataclass(frozen=True)
class IndexManifest:
    """manifest.json of an index directory."""

    schema_version: int  # INDEX_SCHEMA_VERSION when written
    artifact: str  # always INDEX_ARTIFACT
    build_id: str  # names the data directory
    data_dir: str  # "data-<build_id>", relative to the index directory
    created_at: str  # UTC, ISO 8601
    model: dict[str, Any]  # ModelInfo.to_json(): name, weights, config, fingerprint
    embedding_dim: int
    metric: str  # "inner_product" over L2-normalised vectors = cosine similarity
    normalized: bool  # rows are L2-normalised
    templates: list[str]  # verbatim, with {0} as the placeholder; template t <-> template_{t:02d}
    index_kind: str  # backend registry key
    search_params: dict[str, Any]  # default per-call search parameters of the backend
    num_names: int
    num_templates: int
    names_sha256: str  # SHA-256 of names.txt
    source_names_file: str  # the names file the index was built from (absolute path)
    duplicates_dropped: int  # duplicate names skipped while reading the names file
    files: dict[str, int]  # data file -> size in bytes (checked on open)
    encode: dict[str, Any]  # device, precision, batch size, prompts, seconds
    library_versions: dict[str, str]

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo.from_json(self.model)


def template_file(t: int, suffix: str) -> str:
    return f"template_{t:02d}{suffix}"


@dataclass(frozen=True)
class BuildConfig:
    """Everything `build_index` needs."""

    names_file: Path  # UTF-8, one full name per line
    index_dir: Path = Path("idia-index")  # where the index is written
    model: ModelSpec = field(default_factory=ModelSpec)  # model and weights
    templates: tuple[str, ...] = PAPER_TEMPLATES  # normalised templates ({0} placeholder)
    index_kind: str = "auto"  # auto (choose_index), flat, dense, a registry kind or a faiss factory string
    device: DeviceChoice = DeviceChoice.AUTO  # where the text encoder (and a GPU index) runs
    precision: Precision = Precision.FP32  # forward-pass precision of the text encoder
    batch_size: int = 256  # prompts per forward pass
    overwrite: bool = False  # replace an existing index in index_dir
    memory_budget_bytes: int = 8 << 30  # what all templates' indexes may take together (for --index auto)


def _check_index_dir_writable(index_dir: Path, overwrite: bool) -> None:
    if index_dir.exists() and not index_dir.is_dir():
        raise InputError(f"index dir {index_dir} exists and is not a directory")
    if not index_dir.exists():
        return
    if (index_dir / MANIFEST_NAME).exists():
        if not overwrite:
            raise ArtifactExistsError(f"index dir {index_dir} already holds an index; pass --overwrite to replace it")
        return
    ours = {DEFAULT_STORE_NAME}
    foreign = [p.name for p in index_dir.iterdir()
               if p.name not in ours and not p.name.startswith(("data-", BUILD_PREFIX)) and TMP_MARK not in p.name]
    if foreign:
        raise ArtifactExistsError(
            f"index dir {index_dir} is not empty and holds no index ({', '.join(sorted(foreign)[:3])} ...); "
            "choose an empty or new directory"
        )


def _remove_stale_builds(index_dir: Path, keep: str | None) -> None:
    """Delete data directories no manifest refers to (old builds, crashed builds)."""
    for p in index_dir.iterdir():
        stale_data = p.name.startswith("data-") and p.name != keep
        crashed = p.name.startswith(".data-") and TMP_MARK in p.name
        unfinished = p.name.startswith(BUILD_PREFIX)  # another input's interrupted build, now superseded
        if (stale_data or crashed or unfinished) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


COMMIT_EVERY_S = 20.0  # flush vectors + record progress at least this often (and at each template's end)
FILL_CHUNK = 65536  # rows read back per chunk when filling an index
TRAIN_SEED = 0


def vectors_file(t: int) -> str:
    return f"vectors_{t:02d}.npy"


def resolve_index_kind(kind: str, num_names: int, num_templates: int, dim: int, device: str,
                       memory_budget_bytes: int) -> tuple[str, dict[str, Any], str]:
    """(registry kind, default search params, reason) for --index: "auto", "flat", "dense", a registered
    kind, or any faiss factory string ("IVF4096,SQ8", "HNSW32,Flat", ...)."""
    from idia_engine.indexes import backend_kinds, choose_index

    kind = kind.strip()
    if kind == ENSEMBLE_KIND:
        return ENSEMBLE_KIND, {}, "asked for (template-ensemble prefilter over the names' mean embeddings)"
    if kind == "auto":
        choice = choose_index(num_names, num_templates, dim, memory_budget_bytes, device)
        if choice.factory == "Flat" and not choice.gpu_float16:
            return "flat", {}, choice.reason
        return choice.kind, dict(choice.search_params), choice.reason
    if kind in backend_kinds() or ":" in kind:
        return kind, {}, "asked for"
    return f"faiss:{kind}", {}, "asked for (faiss factory string)"


def _build_key(names_sha: str, templates: list[str], model: LoadedModel, kind: str, batch_size: int) -> str:
    h = hashlib.sha256()
    for part in (names_sha, "\x1f".join(templates), model.info.fingerprint, model.precision.value, kind,
                 str(batch_size), str(getattr(model, "text_path", ""))):
        h.update(part.encode("utf-8") + b"\x00")
    return h.hexdigest()[:24]


def _read_progress(build_dir: Path, key: str, n_templates: int) -> dict[str, Any]:
    import json

    path = build_dir / PROGRESS_FILE
    if path.is_file():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            if obj.get("key") == key and len(obj.get("rows", [])) == n_templates:
                return obj
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        log.warning("%s is unreadable or from another build; starting that build over", path)
        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True)
    return {"key": key, "rows": [0] * n_templates, "indexed": [False] * n_templates, "encode_seconds": 0.0}


def _open_vectors(path: Path, n: int, dim: int) -> tuple[Any, int]:
    """An .npy file of float32 [n, dim] opened for writing rows at offsets; returns (file, header bytes)."""
    if not path.exists():
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim)).flush()
    arr = np.load(path, mmap_mode="r")
    if arr.shape != (n, dim) or arr.dtype != np.float32:
        raise ArtifactError(f"{path} holds {arr.shape} {arr.dtype}, expected ({n}, {dim}) float32; "
                            "delete the unfinished build directory and rerun")
    offset = arr.offset
    del arr
    return open(path, "r+b"), offset


def _encode_template(model: LoadedModel, template: str, names: list[str], t: int, build_dir: Path,
                     progress_state: dict[str, Any], batch_size: int, dim: int, on_rows) -> None:
    """Append the embeddings of template t to its vectors file, from the recorded row on (resumable)."""
    start_row = progress_state["rows"][t]
    f, offset = _open_vectors(build_dir / vectors_file(t), len(names), dim)
    last_commit = time.perf_counter()
    t0 = time.perf_counter()
    try:
        row = start_row
        for start in range(start_row, len(names), batch_size):
            emb = model.encode_text([render(template, n) for n in names[start:start + batch_size]])
            f.seek(offset + start * dim * 4)
            f.write(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
            row = start + len(emb)
            on_rows(len(emb))
            if time.perf_counter() - last_commit >= COMMIT_EVERY_S or row == len(names):
                _commit_rows(f, build_dir, progress_state, t, row, time.perf_counter() - t0)
                t0 = last_commit = time.perf_counter()
        if row != progress_state["rows"][t]:
            _commit_rows(f, build_dir, progress_state, t, row, time.perf_counter() - t0)
    finally:
        f.close()


def _commit_rows(f, build_dir: Path, progress_state: dict[str, Any], t: int, rows: int, seconds: float) -> None:
    f.flush()
    os.fsync(f.fileno())  # rows on disk before progress.json says they are
    progress_state["rows"][t] = rows
    progress_state["encode_seconds"] += seconds
    write_json_atomic(build_dir / PROGRESS_FILE, progress_state)


def _fill_index(backend_cls, vectors_path: Path, dim: int, use_gpu: bool, search_params: dict[str, Any],
                out_path: Path) -> None:
    """Train the template's index on a seeded sample of its rows, add all rows in chunks, save it."""
    rows = np.load(vectors_path, mmap_mode="r")
    create_kwargs = {"search_params": search_params} if search_params and hasattr(backend_cls, "factory") else {}
    backend = backend_cls.create(dim, use_gpu=use_gpu, **create_kwargs)
    if getattr(backend, "needs_training", False):
        size = min(len(rows), max(backend.recommended_train_size, backend.min_train_size))
        if size < backend.min_train_size:
            raise InputError(f"index {backend_cls.kind} needs at least {backend.min_train_size} names to train, "
                             f"the names file holds {len(rows)}; choose a smaller index (e.g. --index flat)")
        sample = np.sort(np.random.default_rng(TRAIN_SEED).choice(len(rows), size=size, replace=False))
        backend.train(np.ascontiguousarray(rows[sample]))
    for start in range(0, len(rows), FILL_CHUNK):
        backend.add(np.ascontiguousarray(rows[start:start + FILL_CHUNK]))
    del rows
    backend.save(out_path)


def build_index(config: BuildConfig, progress: Progress = no_progress,
                model: LoadedModel | None = None) -> IndexManifest:
    """Encode every (template, name) prompt and write the index directory; return its manifest.

    Inputs are validated before the model is loaded. `model` may be passed to reuse a loaded model.
    Rerunning an interrupted build with the same inputs resumes it (committed batches are not encoded again).
    """
    index_dir = Path(config.index_dir)
    _check_index_dir_writable(index_dir, config.overwrite)
    if config.index_kind != "auto":  # fail fast on a bad --index, before any model is loaded
        try:
            kind = resolve_index_kind(config.index_kind, 1, 1, 1, "cpu", 1)[0]
            if kind != ENSEMBLE_KIND:
                get_backend(kind)
        except IdiaError as e:
            raise InputError(f"--index {config.index_kind!r} is neither auto, flat, dense nor a valid faiss factory "
                             f"string such as IVF4096,SQ8 or HNSW32,Flat ({e})") from None
    if config.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {config.batch_size}")
    name_list = read_names(config.names_file)
    names = name_list.names
    if model is None:
        model = load_model(config.model, config.device, config.precision)
    use_gpu = model.device.type == "cuda"
    dim = model.info.embed_dim
    templates = list(config.templates)
    kind, search_params, reason = resolve_index_kind(config.index_kind, len(names), len(templates), dim,
                                                     "cuda" if use_gpu else "cpu", config.memory_budget_bytes)
    backend_cls = None if kind == ENSEMBLE_KIND else get_backend(kind)
    exact_kind = bool(getattr(backend_cls, "exact_search", False))
    log.info("index kind %s: %s", kind, reason)

    names_bytes = ("\n".join(names) + "\n").encode("utf-8")
    names_sha = hashlib.sha256(names_bytes).hexdigest()
    key = _build_key(names_sha, templates, model, kind, config.batch_size)
    index_dir.mkdir(parents=True, exist_ok=True)
    build_dir = index_dir / f"{BUILD_PREFIX}{key}"
    build_dir.mkdir(exist_ok=True)
    state = _read_progress(build_dir, key, len(templates))
    resumed = any(state["rows"])  # committed rows of an earlier, interrupted run of this same build
    if resumed:
        log.info("resuming the unfinished build in %s (%d of %d prompts on disk)", build_dir,
                 sum(state["rows"]), len(templates) * len(names))
    if not (build_dir / NAMES_FILE).is_file():
        write_bytes_atomic(build_dir / NAMES_FILE, names_bytes)

    total = len(templates) * len(names)
    done = sum(state["rows"])
    progress("encode prompts", done, total)

    def on_rows(n: int) -> None:
        nonlocal done
        done += n
        progress("encode prompts", done, total)

    t_index = 0.0
    for t, template in enumerate(templates):
        if state["indexed"][t]:
            continue
        _encode_template(model, template, names, t, build_dir, state, config.batch_size, dim, on_rows)
        t1 = time.perf_counter()
        if backend_cls is not None:
            out_path = build_dir / template_file(t, backend_cls.file_suffix)
            _fill_index(backend_cls, build_dir / vectors_file(t), dim, use_gpu, search_params, out_path)
        if exact_kind:  # exact indexes answer from their own rows; the raw copy is not needed
            (build_dir / vectors_file(t)).unlink()
        state["indexed"][t] = True
        write_json_atomic(build_dir / PROGRESS_FILE, state)
        t_index += time.perf_counter() - t1
        progress("index templates", t + 1, len(templates))

    if backend_cls is None and not (build_dir / ENSEMBLE_DIR).is_dir():
        from idia_engine.indexes.ensemble import TemplateEnsemble

        t1 = time.perf_counter()
        sources = [np.load(build_dir / vectors_file(t), mmap_mode="r") for t in range(len(templates))]
        TemplateEnsemble.build(sources, len(names), len(templates), dim, progress=progress).save(
            build_dir / ENSEMBLE_DIR)
        del sources
        t_index += time.perf_counter() - t1
    (build_dir / PROGRESS_FILE).unlink()
    data_files = sorted(p for p in build_dir.rglob("*") if p.is_file())
    files = {p.relative_to(build_dir).as_posix(): p.stat().st_size for p in data_files}
    for p in data_files:  # data on disk before the manifest points at it
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    build_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    data_name = f"data-{build_id}"
    os.replace(build_dir, index_dir / data_name)
    seconds = state["encode_seconds"]

    manifest = IndexManifest(
        schema_version=INDEX_SCHEMA_VERSION,
        artifact=INDEX_ARTIFACT,
        build_id=build_id,
        data_dir=data_name,
        created_at=utc_now(),
        model=model.info.to_json(),
        embedding_dim=dim,
        metric="inner_product",
        normalized=True,
        templates=templates,
        index_kind=backend_cls.kind if backend_cls is not None else ENSEMBLE_KIND,
        search_params=search_params,
        num_names=len(names),
        num_templates=len(templates),
        names_sha256=names_sha,
        source_names_file=str(Path(config.names_file).resolve()),
        duplicates_dropped=name_list.duplicates_dropped,
        files=files,
        encode={"device": str(model.device), "precision": model.precision.value, "batch_size": config.batch_size,
                "text_path": str(getattr(getattr(model, "text_path", None), "value", "stock")),
                "prompts": total, "seconds": round(seconds, 3),
                "prompts_per_second": round(total / seconds, 1) if seconds > 0 else None,
                "index_seconds": round(t_index, 3), "index_choice": reason, "resumed": resumed},
        library_versions=library_versions(),
    )
    write_json_atomic(index_dir / MANIFEST_NAME, asdict(manifest))
    _remove_stale_builds(index_dir, keep=data_name)
    log.info("built index %s: %d names x %d templates in %.1fs", index_dir, len(names), len(templates), seconds)
    return manifest


class NameIndex:
    """An opened index directory: its manifest, name table and per-template backends (loaded lazily)."""

    def __init__(self, root: Path, manifest: IndexManifest, names: list[str]):
        self.root = root
        self.manifest = manifest
        self.names = names
        self._name_to_id: dict[str, int] | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / self.manifest.data_dir

    @property
    def templates(self) -> list[str]:
        return self.manifest.templates

    def name_id(self, name: str) -> int | None:
        if self._name_to_id is None:
            self._name_to_id = {n: i for i, n in enumerate(self.names)}
        return self._name_to_id.get(name)

    def load_template(self, t: int, *, use_gpu: bool = False) -> NameIndexBackend:
        """The backend index of template `t` (rows = names)."""
        cls = get_backend(self.manifest.index_kind)
        path = self.data_dir / template_file(t, cls.file_suffix)
        try:
            backend = cls.load(path, use_gpu=use_gpu)
        except Exception as e:  # faiss raises RuntimeError on corrupt files
            raise ArtifactError(f"index file {path} cannot be read ({str(e).splitlines()[0]}); rebuild the index") from e
        if backend.ntotal != len(self.names) or backend.dim != self.manifest.embedding_dim:
            raise ArtifactError(
                f"index file {path} holds {backend.ntotal} x {backend.dim}, the manifest says "
                f"{len(self.names)} x {self.manifest.embedding_dim}; rebuild the index"
            )
        return backend

    @property
    def exact(self) -> bool:
        """True when the index kind answers exactly by itself (flat, dense): no re-ranking needed."""
        if self.manifest.index_kind == ENSEMBLE_KIND:
            return False
        return bool(getattr(get_backend(self.manifest.index_kind), "exact_search", False))

    def ensemble(self):
        """The template ensemble (index kind "ensemble"): name means, template offsets and radii."""
        from idia_engine.indexes.ensemble import TemplateEnsemble

        return TemplateEnsemble.load(self.data_dir / ENSEMBLE_DIR)

    def vectors(self, t: int) -> np.ndarray:
        """The raw float32 embeddings [N, D] of template t, memory-mapped (approximate kinds only)."""
        path = self.data_dir / vectors_file(t)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: index kind {self.manifest.index_kind} needs the raw vectors "
                                "for exact re-ranking; rebuild the index")
        return np.load(path, mmap_mode="r")

    def check_model(self, info: ModelInfo) -> None:
        """Fail fast when `info` is not the model this index was built with."""
        expected = self.manifest.model_info
        if info.fingerprint != expected.fingerprint:
            raise ManifestMismatchError(
                f"model {info.model} ({info.pretrained}) has fingerprint {info.fingerprint[:12]}, but index "
                f"{self.root} was built with fingerprint {expected.fingerprint[:12]}; the weights changed or "
                "belong to another model: rebuild the index"
            )


def _manifest_from_json(obj: dict[str, Any], path: Path) -> IndexManifest:
    fields = IndexManifest.__dataclass_fields__
    missing = [k for k in fields if k not in obj]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}; it is not an idia-engine {INDEX_SCHEMA_VERSION} manifest")
    return IndexManifest(**{k: obj[k] for k in fields})


def open_index(index_dir: Path) -> NameIndex:
    """Open and verify an index directory (manifest, schema, files, name table)."""

    root = Path(index_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise InputError(f"index dir {root} does not exist; build one with `idia-engine build-index NAMES.txt`")
    if not path.is_file():
        raise ArtifactError(f"index dir {root} holds no {MANIFEST_NAME}; it is not an index (or its build never finished)")
    obj = read_artifact_json(path, INDEX_ARTIFACT, INDEX_SCHEMA_VERSION, "upgrade idia-engine or rebuild the index")
    manifest = _manifest_from_json(obj, path)
    data = root / manifest.data_dir
    for name, size in manifest.files.items():
        p = data / name
        if not p.is_file():
            raise ArtifactError(f"index file {p} is missing; rebuild the index")
        if p.stat().st_size != size:
            raise ArtifactError(f"index file {p} has {p.stat().st_size} bytes, the manifest says {size}; rebuild the index")
    names_bytes = (data / NAMES_FILE).read_bytes()
    if hashlib.sha256(names_bytes).hexdigest() != manifest.names_sha256:
        raise ArtifactError(f"{data / NAMES_FILE} does not match the manifest's checksum; rebuild the index")
    names = names_bytes.decode("utf-8").split("\n")[:-1]
    if len(names) != manifest.num_names:
        raise ArtifactError(f"{data / NAMES_FILE} holds {len(names)} names, the manifest says {manifest.num_names}")
    return NameIndex(root, manifest, names)


def iter_prompt_embeddings(model: LoadedModel, template: str, names: list[str], batch_size: int
                           ) -> Iterator[np.ndarray]:
    """Embeddings of `template` rendered with each name, in order: float32 [<=batch_size, D] chunks."""
    for start in range(0, len(names), batch_size):
        yield model.encode_text([render(template, n) for n in names[start:start + batch_size]])


def encode_name_prompts(model: LoadedModel, templates: list[str], names: list[str], batch_size: int = 256
                        ) -> np.ndarray:
    """Embeddings of every (template, name) prompt: float32 [T, len(names), D], L2-normalised."""
    out = np.zeros((len(templates), len(names), model.info.embed_dim), np.float32)
    for t, template in enumerate(templates):
        if names:
            out[t] = np.concatenate(list(iter_prompt_embeddings(model, template, names, batch_size)))
    return out
