"""Opening a built index for `query`: the manifest, the verified data, the pinned generation.

`open_index` checks the manifest (schema, checksum), every data file's size and the name table's
checksum, and holds the data generation's `.readers.lock` shared until `close()`, so that a concurrent
`build-index --overwrite` switches the manifest but leaves this generation whole. `NameIndex` is what
`indexes.IndexKind.open_searchers` reads templates and raw vectors through.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from idia_engine.indexes import IndexKind, NameIndexBackend, VectorFormatError, get_backend, template_file

from ..disk.locks import shared_lock
from ..disk.textfiles import read_artifact_json
from ..errors import ArtifactError, InputError, ManifestMismatchError
from ..model.load import ModelInfo
from .layout import (
    INDEX_ARTIFACT,
    INDEX_SCHEMA_VERSION,
    MANIFEST_NAME,
    READERS_LOCK,
    IndexManifest,
    existing_manifest,
    manifest_from_json,
    verify_data,
)


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

    @property
    def num_templates(self) -> int:
        return len(self.manifest.templates)

    @property
    def kind(self) -> type[IndexKind]:
        """The index kind's class (how its templates are searched)."""
        return get_backend(self.manifest.index_kind)

    def name_id(self, name: str) -> int | None:
        if self._name_to_id is None:
            self._name_to_id = {n: i for i, n in enumerate(self.names)}
        return self._name_to_id.get(name)

    def load_template(self, t: int, *, use_gpu: bool = False) -> NameIndexBackend:
        """The backend index of template `t` (rows = names), checked against the manifest."""
        cls = self.kind
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

    def vectors(self, t: int) -> np.ndarray:
        """The raw float32 embeddings [N, D] of template t (approximate kinds only): memory-mapped, or read on
        demand from the bf16 rows and their low halves (`indexes.split_rows.SplitRows`)."""
        try:
            return self.kind.raw_rows(self.data_dir, t)
        except VectorFormatError as e:
            raise ArtifactError(f"the raw rows of template {t} cannot be read ({e}); rebuild the index") from e

    def stored_rows(self, t: int) -> np.ndarray:
        """The float32 embeddings [N, D] of template t's prompts as the build stored them (row i = name i), from
        whichever file the index kind keeps them in: the vectors file, the flat index, the dense matrix."""
        return self.kind.stored_rows(self, t)

    def check_model(self, info: ModelInfo) -> None:
        """Fail fast when `info` is not the model this index was built with."""
        expected = self.manifest.model_info
        if info.fingerprint != expected.fingerprint:
            raise ManifestMismatchError(
                f"model {info.model} ({info.pretrained}) has fingerprint {info.fingerprint[:12]}, but index "
                f"{self.root} was built with fingerprint {expected.fingerprint[:12]}; the weights changed or "
                "belong to another model: rebuild the index"
            )


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
        manifest = manifest_from_json(obj, path)
        data = root / manifest.data_dir
        lock_fd = shared_lock(data / READERS_LOCK)
        try:
            names = verify_data(manifest, data)
        except ArtifactError:
            if lock_fd is not None:
                os.close(lock_fd)
            # A build may have replaced (and removed) this generation between our reading the manifest and
            # locking it: read the manifest again. An index that stays broken is reported as it is.
            current = existing_manifest(root)
            if attempt < 4 and current is not None and current["build_id"] != manifest.build_id:
                continue
            raise
        return NameIndex(root, manifest, names, lock_fd)
    raise ArtifactError(f"index dir {root} kept changing while it was opened (builds running?); try again")
