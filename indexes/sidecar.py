"""The JSON sidecar beside a saved faiss index: its description and the statistics behind its certificates.

    path               the faiss index (faiss.write_index; readable by any faiss)
    path + ".json"     {"format", "version", "description": FaissBackend.describe(), "stats": ListStats or null}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from idia_engine.engine.disk.textfiles import (
    BOOL,
    COUNT,
    NUMBER,
    OBJECT,
    STR,
    Fields,
    Nullable,
    check_fields,
)
from idia_engine.engine.errors import ArtifactError

from .bounds import ListStats
from .errors import IndexFileError

SIDECAR_FORMAT = "idia-engine faiss sidecar"
SIDECAR_VERSION = 1
# The keys `FaissBackend.load` and `from_description` read, with their types (a sidecar is read back from
# disk: a wrong type is one line naming the file and the key, not a TypeError inside faiss).
SIDECAR_SCHEMA = Fields(required={
    "format": STR, "version": COUNT,
    "description": Fields(required={"factory": STR, "dim": COUNT, "ntotal": COUNT},
                          optional={"kind": STR, "metric": STR, "search_params": Nullable(OBJECT),
                                    "gpu_float16": BOOL, "sq_range_expansion": NUMBER, "nlist": Nullable(COUNT),
                                    "is_trained": BOOL}),
    "stats": Nullable(OBJECT)})


def sidecar_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_sidecar(path: Path, description: Mapping[str, Any], stats: ListStats | None) -> None:
    """The sidecar of the index at `path`."""
    sidecar = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "description": dict(description),
               "stats": stats.to_json() if stats is not None else None}
    # A plain write: index files go into the engine's private build directory, whose publication (fsync of
    # every file, one rename, then the manifest) is the one commit point; files of an unpublished build
    # directory are rewritten when the build resumes.
    sidecar_path(path).write_text(json.dumps(sidecar, allow_nan=False), encoding="utf-8")


def read_sidecar(path: Path) -> tuple[dict[str, Any], ListStats | None]:
    """(description, statistics) of the index at `path`, or an IndexFileError saying what is wrong."""
    side = sidecar_path(path)
    if not side.is_file():
        raise IndexFileError(f"{side} is missing: a faiss index saved by idia-engine has a sidecar beside it")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise IndexFileError(f"{side} is not a valid sidecar ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or meta.get("version") != SIDECAR_VERSION:
        raise IndexFileError(f"{side} is not a version-{SIDECAR_VERSION} idia-engine faiss sidecar")
    try:
        check_fields(meta, SIDECAR_SCHEMA, side, "rebuild the index")
    except ArtifactError as e:
        raise IndexFileError(str(e)) from None
    desc = meta["description"]
    try:
        stats = ListStats.from_json(meta["stats"]) if meta.get("stats") else None
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFileError(f"{side} has unreadable statistics ({e})") from None
    return desc, stats
