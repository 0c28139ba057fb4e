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
                               # re-ranking and the fallback read (kept only for approximate kinds)
        ensemble/              # the template ensemble (index kind "ensemble")
      .build-<key>/            # an unfinished build: resumed by the same command, removed by a finished one
      image-store/             # the default LMDB embedding store of `query` (survives rebuilds)

The manifest carries a SHA-256 of its own content, so a hand-edited manifest is refused rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def manifest_from_json(obj: dict[str, Any], path: Path) -> IndexManifest:
    """The manifest of a parsed manifest.json, refused when fields are missing or its checksum is wrong."""
    fields = IndexManifest.__dataclass_fields__
    missing = [k for k in fields if k not in obj and k != "manifest_sha256"]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}; it is not an idia-engine {INDEX_SCHEMA_VERSION} manifest")
    recorded = obj.get("manifest_sha256", "")
    if recorded and recorded != manifest_checksum(obj):
        raise ArtifactError(f"{path} was changed after build-index wrote it (its checksum no longer matches); "
                            "restore it or rebuild the index")
    return IndexManifest(**{k: obj[k] for k in fields if k in obj})


def existing_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest.json in `folder` as JSON, or None if there is none that reads and checks out."""
    path = folder / MANIFEST_NAME
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        manifest_from_json(obj, path)
        return obj
    except (OSError, ValueError, TypeError, IdiaError):
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
