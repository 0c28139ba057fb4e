"""The index directory on disk: what `build-index` writes and `query` reads, and the checks of both.

    idx/
      manifest.json            # IndexManifest; written last, atomically: it *is* the commit point
      .build.lock              # held (flock) by the one build-index writing this directory
      data-<build_id>/         # everything the manifest refers to
        .readers.lock          # held shared by every query reading this generation
        manifest.json          # a copy of the manifest that points here (adopted if a crash hit in between)
        names.txt              # the name table: row i of every template index is names[i]
        template_00.faiss ...  # one backend index per template, rows = names, L2-normalised
                               # (+ template_00.faiss.json for faiss factory-string kinds)
        vectors_00.npy ...     # raw float32 embeddings [N, D] per template: the ground truth that exact
                               # re-ranking and the fallback read (kept only for approximate kinds; the bf16
                               # kinds keep vectors_00.low.npy instead: the float32 rows are their bf16 rows
                               # plus these int16 low halves, `indexes.split_rows`)
        ensemble/              # the template ensemble (index kind "ensemble")
      .build-<key>/            # an unfinished build: resumed by the same command, removed by a finished one
      image-store/             # the default LMDB embedding store of `query` (survives rebuilds)

The manifest carries a SHA-256 of its own content, so a hand-edited manifest is refused rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..disk.textfiles import (
    BOOL,
    COUNT,
    INT,
    OBJECT,
    STR,
    DictOf,
    Fields,
    ListOf,
    Nullable,
    check_fields,
    register_schema,
)
from ..errors import ArtifactError, IdiaError
from ..model.load import ModelInfo

INDEX_SCHEMA_VERSION = 1
INDEX_ARTIFACT = "idia-engine name index"
MANIFEST_NAME = "manifest.json"
NAMES_FILE = "names.txt"
DEFAULT_STORE_NAME = "image-store"
BUILD_PREFIX = ".build-"  # an unfinished, resumable build
BUILD_LOCK = ".build.lock"  # one writer per index directory
READERS_LOCK = ".readers.lock"  # inside data-<id>/: queries reading that generation hold it shared
PROGRESS_FILE = "progress.json"


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
    # Names dropped because the model's tokenizer gives them an earlier name's token ids: {"dropped": count,
    # "names": [{"name", "same_tokens_as"}, ...] (the first 1000)}; absent ({}) in indexes built before it.
    token_duplicates: dict[str, Any] = field(default_factory=dict)
    # SHA-256 of this manifest's canonical JSON without this field (manifest_checksum); required on reading.
    manifest_sha256: str = ""

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo.from_json(self.model)


def manifest_checksum(obj: dict[str, Any]) -> str:
    """SHA-256 of a manifest's content (sorted keys, no whitespace), leaving out the checksum field itself."""
    body = {k: v for k, v in obj.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


# The type of every key of manifest.json (IndexManifest's fields, and the model's ModelInfo): a manifest is
# read back from disk, so each is checked before any code relies on it.
MODEL_INFO_SCHEMA = Fields(required={
    "model": STR, "pretrained": STR, "weights_source": STR, "open_clip_name": STR, "model_config": OBJECT,
    "preprocess": OBJECT, "embed_dim": COUNT, "context_length": COUNT, "checkpoint_sha256": Nullable(STR),
    "fingerprint": STR})
INDEX_MANIFEST_SCHEMA = Fields(required={
    "schema_version": INT, "artifact": STR, "build_id": STR, "data_dir": STR, "created_at": STR,
    "model": MODEL_INFO_SCHEMA, "embedding_dim": COUNT, "metric": STR, "normalized": BOOL, "templates": ListOf(STR),
    "index_kind": STR, "search_params": OBJECT, "num_names": COUNT, "num_templates": COUNT, "names_sha256": STR,
    "source_names_file": STR, "duplicates_dropped": COUNT, "files": DictOf(COUNT), "encode": OBJECT,
    "library_versions": DictOf(STR),
    # Required: without it a hand-edited manifest could drop the checksum and be trusted unchecked.
    "manifest_sha256": STR},
    optional={"token_duplicates": OBJECT})
register_schema(INDEX_ARTIFACT, INDEX_MANIFEST_SCHEMA)
_REBUILD = "rebuild the index"


def manifest_from_json(obj: dict[str, Any], path: Path) -> IndexManifest:
    """The manifest of a parsed manifest.json, refused when a key is missing or of the wrong type, when it
    has no checksum or its checksum is wrong, or when it points outside its index directory."""
    check_fields(obj, INDEX_MANIFEST_SCHEMA, path, _REBUILD)
    if obj["manifest_sha256"] != manifest_checksum(obj):
        what = "has an empty manifest_sha256" if not obj["manifest_sha256"] else \
            "was changed after build-index wrote it (its checksum no longer matches)"
        raise ArtifactError(f"{path} {what}; restore it or {_REBUILD}")
    # Files are opened as <index>/<data_dir>/<name>: relative paths that stay inside, so nothing outside the
    # index directory is ever read (the data directory itself is one plain name).
    for name in [obj["data_dir"], *obj["files"]]:
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in parts) \
                or (name == obj["data_dir"] and len(parts) > 1):
            raise ArtifactError(f"{path} names the file {name!r}, which is not a path inside the index; {_REBUILD}")
    if obj["data_dir"] != f"data-{obj['build_id']}":
        raise ArtifactError(f"{path}: key 'data_dir' is {obj['data_dir']!r}, expected 'data-{obj['build_id']}'; "
                            f"{_REBUILD}")
    if len(obj["templates"]) != obj["num_templates"]:
        raise ArtifactError(f"{path} lists {len(obj['templates'])} templates, its key 'num_templates' says "
                            f"{obj['num_templates']}; {_REBUILD}")
    return IndexManifest(**{k: obj[k] for k in IndexManifest.__dataclass_fields__ if k in obj})


def existing_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest.json in `folder` as JSON, or None if there is none that reads and checks out."""
    path = folder / MANIFEST_NAME
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        manifest_from_json(obj, path)
        return obj
    except (OSError, ValueError, TypeError, RecursionError, IdiaError):
        return None


def names_bytes(names: list[str]) -> bytes:
    """The bytes of names.txt: one name a line, UTF-8."""
    return ("\n".join(names) + "\n").encode("utf-8")


def verify_data(manifest: IndexManifest, data: Path) -> list[str]:
    """Check every data file against the manifest; return the name table."""
    for name, size in manifest.files.items():
        p = data / name
        if not p.is_file():
            raise ArtifactError(f"index file {p} is missing; rebuild the index")
        if p.stat().st_size != size:
            raise ArtifactError(f"index file {p} has {p.stat().st_size} bytes, the manifest says {size}; rebuild the index")
    try:
        raw = (data / NAMES_FILE).read_bytes()
    except OSError as e:  # removed between the checks above and now (a build replaced this generation)
        raise ArtifactError(f"{data / NAMES_FILE} cannot be read ({e.strerror or e}); rebuild the index") from None
    if hashlib.sha256(raw).hexdigest() != manifest.names_sha256:
        raise ArtifactError(f"{data / NAMES_FILE} does not match the manifest's checksum; rebuild the index")
    names = raw.decode("utf-8").split("\n")[:-1]
    if len(names) != manifest.num_names:
        raise ArtifactError(f"{data / NAMES_FILE} holds {len(names)} names, the manifest says {manifest.num_names}")
    return names
