"""The name index on disk: what `build-index` writes and `query` reads.

Layout of an index directory:

    idx/
      manifest.json            # IndexManifest; written last, atomically: it *is* the commit point
      data-<build_id>/         # everything the manifest refers to
        names.txt              # the name table: row i of every template index is names[i]
        template_00.faiss ...  # one backend index per template, rows = names, L2-normalised
      image-store/             # the default LMDB embedding store of `query` (survives rebuilds)

A build writes a new `data-<build_id>` directory under a temporary name, renames it into place, then
replaces `manifest.json`. A crash at any point leaves the previous index (or none) loadable and never a
half-written one; leftovers are removed by the next build. A reader that has opened the manifest keeps
seeing one whole build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from idia_engine.indexes import DEFAULT_BACKEND, NameIndexBackend, get_backend

from .atomic import TMP_MARK, staged_directory, write_json_atomic
from .errors import ArtifactError, ArtifactExistsError, InputError, ManifestMismatchError
from .model import DeviceChoice, LoadedModel, ModelInfo, ModelSpec, Precision, load_model
from .names import read_names
from .progress import Progress, no_progress
from .templates import PAPER_TEMPLATES, render
from .versions import library_versions, utc_now

log = logging.getLogger(__name__)

INDEX_SCHEMA_VERSION = 1
INDEX_ARTIFACT = "idia-engine name index"
MANIFEST_NAME = "manifest.json"
NAMES_FILE = "names.txt"
DEFAULT_STORE_NAME = "image-store"

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
    index_kind: str = DEFAULT_BACKEND  # backend registry key
    device: DeviceChoice = DeviceChoice.AUTO  # where the text encoder (and a GPU index) runs
    precision: Precision = Precision.FP32  # forward-pass precision of the text encoder
    batch_size: int = 256  # prompts per forward pass
    overwrite: bool = False  # replace an existing index in index_dir


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
               if p.name not in ours and not p.name.startswith("data-") and TMP_MARK not in p.name]
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
        if (stale_data or crashed) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def build_index(config: BuildConfig, progress: Progress = no_progress,
                model: LoadedModel | None = None) -> IndexManifest:
    """Encode every (template, name) prompt and write the index directory; return its manifest.

    Inputs are validated before the model is loaded. `model` may be passed to reuse a loaded model.
    """
    index_dir = Path(config.index_dir)
    _check_index_dir_writable(index_dir, config.overwrite)
    backend_cls = get_backend(config.index_kind)
    if config.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {config.batch_size}")
    name_list = read_names(config.names_file)
    names = name_list.names
    if model is None:
        model = load_model(config.model, config.device, config.precision)
    use_gpu = model.device.type == "cuda"
    dim = model.info.embed_dim
    templates = list(config.templates)

    index_dir.mkdir(parents=True, exist_ok=True)
    build_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    data_name = f"data-{build_id}"
    total = len(templates) * len(names)
    t0 = time.perf_counter()
    with staged_directory(index_dir / data_name, replace_existing=False) as tmp:
        names_bytes = ("\n".join(names) + "\n").encode("utf-8")
        (tmp / NAMES_FILE).write_bytes(names_bytes)
        done = 0
        progress("encode prompts", 0, total)
        for t, template in enumerate(templates):
            backend: NameIndexBackend = backend_cls.create(dim, use_gpu=use_gpu)
            for emb in iter_prompt_embeddings(model, template, names, config.batch_size):
                backend.add(emb)
                done += len(emb)
                progress("encode prompts", done, total)
            backend.save(tmp / template_file(t, backend_cls.file_suffix))
            del backend
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        for p in tmp.iterdir():  # data on disk before the manifest points at it
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    seconds = time.perf_counter() - t0

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
        index_kind=backend_cls.kind,
        search_params={},
        num_names=len(names),
        num_templates=len(templates),
        names_sha256=hashlib.sha256(names_bytes).hexdigest(),
        source_names_file=str(Path(config.names_file).resolve()),
        duplicates_dropped=name_list.duplicates_dropped,
        files=files,
        encode={"device": str(model.device), "precision": model.precision.value, "batch_size": config.batch_size,
                "prompts": total, "seconds": round(seconds, 3),
                "prompts_per_second": round(total / seconds, 1) if seconds > 0 else None},
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
    import json

    root = Path(index_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise InputError(f"index dir {root} does not exist; build one with `idia-engine build-index NAMES.txt`")
    if not path.is_file():
        raise ArtifactError(f"index dir {root} holds no {MANIFEST_NAME}; it is not an index (or its build never finished)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rebuild the index") from None
    if not isinstance(obj, dict) or obj.get("artifact") != INDEX_ARTIFACT:
        raise ArtifactError(f"{path} is not an idia-engine name index manifest")
    version = obj.get("schema_version")
    if version != INDEX_SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {version}; this idia-engine reads version {INDEX_SCHEMA_VERSION} "
            "(upgrade idia-engine or rebuild the index)"
        )
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
