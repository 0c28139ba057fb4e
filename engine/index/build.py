"""The name index on disk: what `build-index` writes and `query` reads.

Layout of an index directory:

    idx/
      manifest.json            # IndexManifest; written last, atomically: it *is* the commit point
      .build.lock              # held (flock) by the one build-index writing this directory
      data-<build_id>/         # everything the manifest refers to
        .readers.lock          # held shared by every query reading this generation
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
never a half-written one.

Concurrency (engine/locks.py): one build at a time per index directory (a second one stops with a one-line
error). A query pins the generation it opened with a shared lock on its `.readers.lock`; the build that
replaces that generation deletes it only when no query holds it, so a query running through an
`--overwrite` sees the old index whole, and the next query sees the new one. The manifest carries a
SHA-256 of its own content, so a hand-edited manifest is refused rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
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

from ..candidates.names_file import NameList, read_names
from ..candidates.prompt_lengths import case_twins, check_prompt_lengths
from ..candidates.templates import PAPER_TEMPLATES, render
from ..disk.atomic import TMP_MARK, write_bytes_atomic, write_json_atomic
from ..disk.faults import fault_point
from ..disk.locks import exclusive_lock, shared_lock, try_exclusive
from ..disk.textfiles import read_artifact_json
from ..disk.versions import library_versions, utc_now
from ..errors import (
    ArtifactError,
    ArtifactExistsError,
    IdiaError,
    InputError,
    ManifestMismatchError,
)
from ..model.load import (
    DeviceChoice,
    LoadedModel,
    ModelInfo,
    ModelSpec,
    Precision,
    load_model,
)
from ..progress import Progress, no_progress

log = logging.getLogger(__name__)

INDEX_SCHEMA_VERSION = 1
INDEX_ARTIFACT = "idia-engine name index"
MANIFEST_NAME = "manifest.json"
NAMES_FILE = "names.txt"
DEFAULT_STORE_NAME = "image-store"
BUILD_PREFIX = ".build-"  # an unfinished, resumable build
BUILD_LOCK = ".build.lock"  # one writer per index directory
READERS_LOCK = ".readers.lock"  # inside data-<id>/: queries reading that generation hold it shared
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
    # SHA-256 of this manifest's canonical JSON without this field (manifest_checksum); "" in older indexes.
    manifest_sha256: str = ""

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo.from_json(self.model)


def manifest_checksum(obj: dict[str, Any]) -> str:
    """SHA-256 of a manifest's content (sorted keys, no whitespace), leaving out the checksum field itself."""
    body = {k: v for k, v in obj.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


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


def _already_built(index_dir: Path) -> ArtifactExistsError:
    return ArtifactExistsError(f"index dir {index_dir} already holds an index of other inputs; "
                               "pass --overwrite to replace it")


def _existing_manifest(index_dir: Path) -> dict[str, Any] | None:
    """The current manifest of index_dir as JSON, or None if there is none that reads and checks out."""
    path = index_dir / MANIFEST_NAME
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        _manifest_from_json(obj, path)
        return obj
    except (OSError, ValueError, TypeError, IdiaError):
        return None


def _check_index_dir_writable(index_dir: Path, overwrite: bool, names_sha: str | None = None,
                              templates: list[str] | None = None) -> None:
    """Refuse an index dir that is a file, holds foreign files, or holds an index of other inputs.

    An index of the same names and templates passes: whether it is the same build (same model too) is
    decided once the model is loaded, and then the build is a no-op (rerunning a finished build is safe).
    """
    if index_dir.exists() and not index_dir.is_dir():
        raise InputError(f"index dir {index_dir} exists and is not a directory")
    if not index_dir.exists():
        return
    if (index_dir / MANIFEST_NAME).exists():
        if overwrite:
            return
        current = _existing_manifest(index_dir)
        if current is None or names_sha is None or current.get("names_sha256") != names_sha \
                or current.get("templates") != templates:
            raise _already_built(index_dir)
        return
    ours = {DEFAULT_STORE_NAME, BUILD_LOCK}
    foreign = [p.name for p in index_dir.iterdir()
               if p.name not in ours and not p.name.startswith(("data-", BUILD_PREFIX)) and TMP_MARK not in p.name]
    if foreign:
        raise ArtifactExistsError(
            f"index dir {index_dir} is not empty and holds no index ({', '.join(sorted(foreign)[:3])} ...); "
            "choose an empty or new directory"
        )


def _remove_stale_builds(index_dir: Path, keep: str | None) -> None:
    """Delete data directories no manifest refers to (old builds, crashed builds), except generations that
    a running query still reads (it holds their .readers.lock): a later build removes those."""
    for p in index_dir.iterdir():
        if p.is_file() and TMP_MARK in p.name:  # a manifest write cut short by a kill (we hold the build lock)
            p.unlink(missing_ok=True)
            continue
        stale_data = p.name.startswith("data-") and p.name != keep
        crashed = p.name.startswith(".data-") and TMP_MARK in p.name
        unfinished = p.name.startswith(BUILD_PREFIX)  # another input's interrupted build, now superseded
        if not ((stale_data or crashed or unfinished) and p.is_dir()):
            continue
        fd = try_exclusive(p / READERS_LOCK) if stale_data else -1
        if fd is None:
            log.info("kept %s: a query is reading it (removed by a later build)", p)
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
        finally:
            if fd >= 0:
                os.close(fd)


# Flush vectors + record progress at least this often (and at each template's end). The environment
# variable exists for the crash tests, which need commits every batch.
COMMIT_EVERY_S = float(os.environ.get("IDIA_COMMIT_EVERY_S", "20"))
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
    fault_point("build.encode.committed")


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

    Inputs are validated before anything is written or the model is loaded. `model` may be passed to reuse
    a loaded model. Rerunning an interrupted build with the same inputs resumes it (committed batches are
    not encoded again). One build at a time per index directory: a second one raises LockBusyError.
    """
    index_dir = Path(config.index_dir)
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
    names_sha = hashlib.sha256(_names_bytes(name_list.names)).hexdigest()
    _check_index_dir_writable(index_dir, config.overwrite, names_sha, list(config.templates))
    created = not index_dir.exists()
    index_dir.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(index_dir / BUILD_LOCK, f"index dir {index_dir} (build-index)"):
            # Again, under the lock: another build may just have finished.
            _check_index_dir_writable(index_dir, config.overwrite, names_sha, list(config.templates))
            return _build_locked(config, name_list, progress, model)
    except BaseException:
        if created:  # leave no empty index directory behind, but keep any resumable work
            leftovers = [q for q in index_dir.iterdir() if q.name != BUILD_LOCK]
            if not leftovers:
                shutil.rmtree(index_dir, ignore_errors=True)
        raise


def _names_bytes(names: list[str]) -> bytes:
    return ("\n".join(names) + "\n").encode("utf-8")


def _finished_build(index_dir: Path, key: str, overwrite: bool) -> IndexManifest | None:
    """A build of exactly these inputs that already finished, made current; None if there is none.

    - The current index is this build (a rerun of a finished build): nothing to do.
    - A data-<id> directory of this build was published but its manifest never became current (a crash
      between the two steps): its own copy of the manifest is made current. No prompt is encoded again.
    """
    current = _existing_manifest(index_dir)
    if current is not None and not overwrite:
        if current.get("encode", {}).get("build_key") != key:
            raise _already_built(index_dir)
        log.info("index dir %s already holds this build (same names, templates, model, kind): nothing to do", index_dir)
        _remove_stale_builds(index_dir, keep=current["data_dir"])
        return _manifest_from_json(current, index_dir / MANIFEST_NAME)
    for data in sorted(index_dir.glob("data-*")):
        if current is not None and data.name == current["data_dir"]:
            continue
        copy = _existing_manifest(data)
        if copy is None or copy.get("encode", {}).get("build_key") != key or copy.get("data_dir") != data.name:
            continue
        manifest = _manifest_from_json(copy, data / MANIFEST_NAME)
        try:
            _verify_data(manifest, data)
        except ArtifactError:
            continue
        log.info("found the finished build %s of these inputs (its manifest was never made current): using it", data)
        write_json_atomic(index_dir / MANIFEST_NAME, copy)
        _remove_stale_builds(index_dir, keep=data.name)
        return manifest
    return None


def _build_locked(config: BuildConfig, name_list: NameList, progress: Progress,
                  model: LoadedModel | None) -> IndexManifest:
    index_dir = Path(config.index_dir)
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
    # Prompts longer than the text tower's context are cut by the tokenizer without a word: say so, and
    # which names then get identical prompts (and so identical embeddings).
    lengths = check_prompt_lengths(model.tokenizer, templates, names, model.info.context_length)
    for line in lengths.warning_lines():
        log.warning("%s: %s", config.names_file, line)
    prompt_lengths = {k: v for k, v in lengths.to_json().items() if k != "seconds"}
    twins = case_twins(model.tokenizer, names)
    if twins:
        log.warning("%s: %d name(s) differ from an earlier one only in letter case (e.g. %r and %r); the model's "
                    "tokenizer lower-cases, so their prompts are identical and they tie on every image",
                    config.names_file, len(twins), *twins[0])
    prompt_lengths["case_twins"] = len(twins)

    names_bytes = _names_bytes(names)
    names_sha = hashlib.sha256(names_bytes).hexdigest()
    key = _build_key(names_sha, templates, model, kind, config.batch_size)
    finished = _finished_build(index_dir, key, config.overwrite)
    if finished is not None:
        return finished
    build_dir = index_dir / f"{BUILD_PREFIX}{key}"
    build_dir.mkdir(exist_ok=True)
    for leftover in build_dir.rglob(f"*{TMP_MARK}*"):  # half-written files of a killed run (atomic writes)
        if leftover.is_file():
            leftover.unlink()
    state = _read_progress(build_dir, key, len(templates))
    reused = sum(state["rows"])  # committed rows of an earlier, interrupted run of this same build
    resumed = reused > 0
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
        fault_point("build.template.indexed")
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
    (build_dir / READERS_LOCK).touch()  # queries pin this generation with it (not a data file)
    data_files = sorted(p for p in build_dir.rglob("*")
                        if p.is_file() and p.name != READERS_LOCK and TMP_MARK not in p.name)
    files = {p.relative_to(build_dir).as_posix(): p.stat().st_size for p in data_files}
    for p in data_files:  # data on disk before the manifest points at it
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    build_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    data_name = f"data-{build_id}"
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
                "index_seconds": round(t_index, 3), "index_choice": reason, "resumed": resumed,
                "prompts_reused": reused, "build_key": key, "prompt_lengths": prompt_lengths},
        library_versions=library_versions(),
    )
    obj = asdict(manifest)
    obj["manifest_sha256"] = manifest_checksum(obj)
    manifest = IndexManifest(**obj)
    # A copy travels with the data (not one of its files): a crash right after publishing loses nothing.
    write_json_atomic(build_dir / MANIFEST_NAME, obj)
    os.replace(build_dir, index_dir / data_name)
    fault_point("build.data.published")
    write_json_atomic(index_dir / MANIFEST_NAME, obj)
    fault_point("build.manifest.written")
    _remove_stale_builds(index_dir, keep=data_name)
    log.info("built index %s: %d names x %d templates in %.1fs", index_dir, len(names), len(templates), seconds)
    return manifest


class NameIndex:
    """An opened index directory: its manifest, name table and per-template backends (loaded lazily)."""

    def __init__(self, root: Path, manifest: IndexManifest, names: list[str], lock_fd: int | None = None):
        self.root = root
        self.manifest = manifest
        self.names = names
        self._name_to_id: dict[str, int] | None = None
        self._lock_fd = lock_fd  # shared lock on data_dir/.readers.lock: pins this generation

    def close(self) -> None:
        """Release this generation (a later build may then remove it if it is no longer current)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> NameIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

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
    missing = [k for k in fields if k not in obj and k != "manifest_sha256"]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}; it is not an idia-engine {INDEX_SCHEMA_VERSION} manifest")
    recorded = obj.get("manifest_sha256", "")
    if recorded and recorded != manifest_checksum(obj):
        raise ArtifactError(f"{path} was changed after build-index wrote it (its checksum no longer matches); "
                            "restore it or rebuild the index")
    return IndexManifest(**{k: obj[k] for k in fields if k in obj})


def open_index(index_dir: Path) -> NameIndex:
    """Open and verify an index directory (manifest, schema, checksum, files, name table).

    The returned index holds its data generation locked for reading until `close()` (or the process
    ends): a concurrent `build-index --overwrite` switches the manifest but leaves this generation whole.
    """
    root = Path(index_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise InputError(f"index dir {root} does not exist; build one with `idia-engine build-index NAMES.txt`")
    for attempt in range(5):
        if not path.is_file():
            raise ArtifactError(f"index dir {root} holds no {MANIFEST_NAME}; it is not an index "
                                "(or its build never finished)")
        obj = read_artifact_json(path, INDEX_ARTIFACT, INDEX_SCHEMA_VERSION, "upgrade idia-engine or rebuild the index")
        manifest = _manifest_from_json(obj, path)
        data = root / manifest.data_dir
        lock_fd = shared_lock(data / READERS_LOCK)
        try:
            names = _verify_data(manifest, data)
        except ArtifactError:
            if lock_fd is not None:
                os.close(lock_fd)
            # A build may have replaced (and removed) this generation between our reading the manifest and
            # locking it: read the manifest again. An index that stays broken is reported as it is.
            current = _existing_manifest(root)
            if attempt < 4 and current is not None and current["build_id"] != manifest.build_id:
                continue
            raise
        return NameIndex(root, manifest, names, lock_fd)
    raise ArtifactError(f"index dir {root} kept changing while it was opened (builds running?); try again")


def _verify_data(manifest: IndexManifest, data: Path) -> list[str]:
    """Check every data file against the manifest; return the name table."""
    for name, size in manifest.files.items():
        p = data / name
        if not p.is_file():
            raise ArtifactError(f"index file {p} is missing; rebuild the index")
        if p.stat().st_size != size:
            raise ArtifactError(f"index file {p} has {p.stat().st_size} bytes, the manifest says {size}; rebuild the index")
    try:
        names_bytes = (data / NAMES_FILE).read_bytes()
    except OSError as e:  # removed between the checks above and now (a build replaced this generation)
        raise ArtifactError(f"{data / NAMES_FILE} cannot be read ({e.strerror or e}); rebuild the index") from None
    if hashlib.sha256(names_bytes).hexdigest() != manifest.names_sha256:
        raise ArtifactError(f"{data / NAMES_FILE} does not match the manifest's checksum; rebuild the index")
    names = names_bytes.decode("utf-8").split("\n")[:-1]
    if len(names) != manifest.num_names:
        raise ArtifactError(f"{data / NAMES_FILE} holds {len(names)} names, the manifest says {manifest.num_names}")
    return names


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
