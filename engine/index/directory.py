"""Housekeeping of an index directory: what a build may write into, finished builds, stale generations.

Concurrency: one build at a time per index directory (`.build.lock`, held by `build_index`). A query pins
the generation it opened with a shared lock on its `.readers.lock`; the build that replaces that
generation deletes it only when no query holds it, so a query running through an `--overwrite` sees the
old index whole, and the next query sees the new one.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..disk.atomic import TMP_MARK, write_json_atomic
from ..disk.locks import try_exclusive
from ..errors import ArtifactError, ArtifactExistsError, InputError
from .layout import (
    BUILD_LOCK,
    BUILD_PREFIX,
    DEFAULT_STORE_NAME,
    MANIFEST_NAME,
    READERS_LOCK,
    IndexManifest,
    existing_manifest,
    manifest_from_json,
    verify_data,
)

log = logging.getLogger(__name__)


def already_built(index_dir: Path) -> ArtifactExistsError:
    return ArtifactExistsError(f"index dir {index_dir} already holds an index of other inputs; "
                               "pass --overwrite to replace it")


def check_index_dir_writable(index_dir: Path, overwrite: bool, names_sha: str | None = None,
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
        current = existing_manifest(index_dir)
        if current is None or names_sha is None or current.get("names_sha256") != names_sha \
                or current.get("templates") != templates:
            raise already_built(index_dir)
        return
    ours = {DEFAULT_STORE_NAME, BUILD_LOCK}
    foreign = [p.name for p in index_dir.iterdir()
               if p.name not in ours and not p.name.startswith(("data-", BUILD_PREFIX)) and TMP_MARK not in p.name]
    if foreign:
        raise ArtifactExistsError(
            f"index dir {index_dir} is not empty and holds no index ({', '.join(sorted(foreign)[:3])} ...); "
            "choose an empty or new directory"
        )


def remove_stale_builds(index_dir: Path, keep: str | None) -> None:
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


def finished_build(index_dir: Path, key: str, overwrite: bool) -> IndexManifest | None:
    """A build of exactly these inputs that already finished, made current; None if there is none.

    - The current index is this build (a rerun of a finished build): nothing to do.
    - A data-<id> directory of this build was published but its manifest never became current (a crash
      between the two steps): its own copy of the manifest is made current. No prompt is encoded again.
    """
    current = existing_manifest(index_dir)
    if current is not None and not overwrite:
        if current.get("encode", {}).get("build_key") != key:
            raise already_built(index_dir)
        log.info("index dir %s already holds this build (same names, templates, model, kind): nothing to do", index_dir)
        remove_stale_builds(index_dir, keep=current["data_dir"])
        return manifest_from_json(current, index_dir / MANIFEST_NAME)
    for data in sorted(index_dir.glob("data-*")):
        if current is not None and data.name == current["data_dir"]:
            continue
        copy = existing_manifest(data)
        if copy is None or copy.get("encode", {}).get("build_key") != key or copy.get("data_dir") != data.name:
            continue
        manifest = manifest_from_json(copy, data / MANIFEST_NAME)
        try:
            verify_data(manifest, data)
        except ArtifactError:
            continue
        log.info("found the finished build %s of these inputs (its manifest was never made current): using it", data)
        write_json_atomic(index_dir / MANIFEST_NAME, copy)
        remove_stale_builds(index_dir, keep=data.name)
        return manifest
    return None
