"""Encoding prompts: every (template, name) prompt through the model's text tower.

A build streams: each template's prompts are encoded in batches and appended to its vectors file
(float32 [N, D] `.npy`); every COMMIT_EVERY_S seconds, and at the template's end, the file is flushed and
`progress.json` records the rows on disk, so an interrupted build resumes where it stopped with nothing
committed encoded again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from idia_engine.indexes import vectors_file

from ..candidates.templates import render
from ..disk.atomic import write_json_atomic
from ..disk.faults import fault_point
from ..disk.space import allocate_npy
from ..errors import ArtifactError
from ..model.load import LoadedModel
from .layout import PROGRESS_FILE

log = logging.getLogger(__name__)

# Flush vectors + record progress at least this often (and at each template's end). The environment
# variable exists for the crash tests, which need commits every batch.
COMMIT_EVERY_S = float(os.environ.get("IDIA_COMMIT_EVERY_S", "20"))


def read_progress(build_dir: Path, key: str, n_templates: int) -> dict[str, Any]:
    """progress.json of an unfinished build of `key` (rows on disk and templates indexed, per template), or a
    fresh state; a file of another build (or unreadable) empties the build directory."""
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


def save_progress(build_dir: Path, state: dict[str, Any]) -> None:
    write_json_atomic(build_dir / PROGRESS_FILE, state)


def _open_vectors(path: Path, n: int, dim: int) -> tuple[BinaryIO, int]:
    """An .npy file of float32 [n, dim] opened for writing rows at offsets; returns (file, header bytes)."""
    if not path.exists():  # its blocks reserved now: a full disk is one line before any encoding, not mid-build
        allocate_npy(path, np.float32, (n, dim)).flush()
    arr = np.load(path, mmap_mode="r")
    if arr.shape != (n, dim) or arr.dtype != np.float32:
        raise ArtifactError(f"{path} holds {arr.shape} {arr.dtype}, expected ({n}, {dim}) float32; "
                            "delete the unfinished build directory and rerun")
    offset = arr.offset
    del arr
    return open(path, "r+b"), offset


def encode_template(model: LoadedModel, template: str, names: list[str], t: int, build_dir: Path,
                    state: dict[str, Any], batch_size: int, on_rows: Callable[[int], None],
                    batches: Iterator[np.ndarray] | None = None) -> None:
    """Append the embeddings of template t to its vectors file, from the recorded row on (resumable).

    They are computed by `model` here, batch after batch, or come as `batches`: the same batches (from the
    recorded row on, `batch_size` rows each) computed elsewhere (Ray actors, `ray_encode.py`)."""
    dim = model.info.embed_dim
    start_row = state["rows"][t]
    if batches is None:
        batches = iter_prompt_embeddings(model, template, names[start_row:], batch_size)
    f, offset = _open_vectors(build_dir / vectors_file(t), len(names), dim)
    last_commit = time.perf_counter()
    t0 = time.perf_counter()
    try:
        row = start_row
        for start, emb in zip(range(start_row, len(names), batch_size), batches):
            if emb.shape != (min(batch_size, len(names) - start), dim):
                raise ArtifactError(f"template {t} rows {start}..: got embeddings of shape {emb.shape}, expected "
                                    f"({min(batch_size, len(names) - start)}, {dim})")
            f.seek(offset + start * dim * 4)
            f.write(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
            row = start + len(emb)
            on_rows(len(emb))
            if time.perf_counter() - last_commit >= COMMIT_EVERY_S or row == len(names):
                _commit_rows(f, build_dir, state, t, row, time.perf_counter() - t0)
                t0 = last_commit = time.perf_counter()
        if row != state["rows"][t]:
            _commit_rows(f, build_dir, state, t, row, time.perf_counter() - t0)
        if row != len(names):  # the batches ran out early: what came is committed, the template is not done
            raise ArtifactError(f"template {t}: embeddings stopped at row {row} of {len(names)}; rerun to resume")
    finally:
        f.close()


def _commit_rows(f: BinaryIO, build_dir: Path, state: dict[str, Any], t: int, rows: int, seconds: float) -> None:
    f.flush()
    os.fsync(f.fileno())  # rows on disk before progress.json says they are
    state["rows"][t] = rows
    state["encode_seconds"] += seconds
    save_progress(build_dir, state)
    fault_point("build.encode.committed")


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
