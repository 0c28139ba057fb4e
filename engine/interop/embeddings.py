"""`query --embeddings`: the photos' embeddings read from a folder in clip-retrieval's layout instead of computed.

The engine cannot verify embeddings it did not compute: it never saw the photos, and a vector does not
say which model made it. So the folder is used only when the user names the model it came from
(`--embeddings-model`), and that name must be the index's model: its `--model` as the index manifest
records it, or its fingerprint (12 or more leading hex digits; the fingerprint also pins the weights,
which a model name alone does not). The dimension must be the index's. Where the metadata carries a
`model_fingerprint` column (an `idia-engine export` does), every row must name the index's model. The
summary, the log and `--help` say the rest is the user's word.

Who is in each row: the metadata column `--embeddings-person-column` (values are names, NFC-normalised
and stripped like a CSV manifest's); by default the `name` column when the metadata has one, else the
parent folder of `image_path`, with `_` read as a space as in a faces folder. Rows with no person (null
or empty) are left out and counted. Persons are in name order and each person's rows in file order, as
`query` orders photos; every row is one photo, except that one photo has one vote as in `query`: where a
`sha256` column gives a row's photo bytes, a later row of the same person with the same sha256 is left out
(summary.json's duplicate_photos, as for files). Rows without a sha256 cannot be told to be one photo.

Rows must be L2-normalised, as the engine's own are: a row whose norm is within `NORM_TOLERANCE` of 1
(float16 storage of a unit row stays within 5e-4) is used exactly as stored, so an export read back
scores bit for bit like the store it came from; any other row is scaled to unit norm (in float64), with
a warning and a count in summary.json, since paper mode's arg-max does not depend on a row's length but
the cosines reported do. A row with a non-finite value or norm 0 is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..candidates.names_file import check_name, normalize_name
from ..errors import InputError
from ..model.load import ModelInfo
from ..query.images import DuplicatePhoto, name_key, person_name_from_folder
from .clip_retrieval import (
    EXPORT_ARTIFACT,
    EXPORT_IMAGES,
    EXPORT_SIDECAR,
    FINGERPRINT_COLUMN,
    IMAGE_EMBEDDINGS,
    Shard,
    column_names,
    open_rows,
    read_columns,
    read_shards,
)

NORM_TOLERANCE = 1e-3  # |norm - 1| up to this: the row is used as stored
NAME_COLUMN = "name"  # the default person column
PATH_COLUMN = "image_path"  # clip-retrieval's path column; its parent folder names the person otherwise
SHA_COLUMN = "sha256"  # an export's content hash of each photo, carried into images.csv
_CHECK_CHUNK = 65536  # rows checked for finiteness and norm at once
UNVERIFIED = ("idia-engine did not compute these embeddings and cannot verify them: it takes the user's word "
              "that they are image embeddings of the index's model, one per photo of the person named")


@dataclass(frozen=True)
class EmbeddingsInput:
    """Image embeddings computed elsewhere, in clip-retrieval's layout, queried instead of photos."""

    folder: Path  # img_emb/ beside metadata/, or an `idia-engine export` folder (its images/ are read)
    model: str | None = None  # the model the user says computed them: required, must be the index's
    person_column: str | None = None  # metadata column naming each row's person (None: `name`, else image_path)

    def __post_init__(self) -> None:
        if self.model is None or not self.model.strip():
            raise InputError(f"--embeddings {self.folder} needs --embeddings-model NAME, the model that computed "
                             "them (the index's --model or its fingerprint): idia-engine cannot verify embeddings "
                             "it did not compute")
        if self.person_column is not None and not self.person_column.strip():
            raise InputError("--embeddings-person-column is empty; give a metadata column such as name")


def check_declared_model(declared: str, info: ModelInfo, index_dir: Path) -> None:
    """Refuse a declared model that is neither the index model's name nor its fingerprint."""
    said = declared.strip()
    if _is_hex(said) and len(said) >= 12:
        if info.fingerprint.startswith(said.lower()):
            return
    elif said == info.model or str(Path(said).expanduser().absolute()) == info.model:
        return
    raise InputError(f"--embeddings-model {said!r} is not the model of index {index_dir}, which was built with "
                     f"{info.model} ({info.pretrained}), fingerprint {info.fingerprint[:12]}; embeddings of another "
                     "model cannot be scored against its names (give that name or fingerprint only if they came "
                     "from it)")


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text.lower())


@dataclass(frozen=True)
class EmbeddedPhotos:
    """What a folder of embeddings gives `query`: persons, their rows and the embeddings of those rows."""

    folder: Path  # the layout folder read (the export's images/ for an export)
    persons: dict[str, list[str]]  # person -> the path (or shard position) of each of their rows, in name order
    rows: list[tuple[str, str, str]]  # (person, path, sha256 or "") in report order
    images: "ShardRows"  # their embeddings, row m = rows[m]
    person_column: str  # the column persons came from ("image_path" when from its parent folder)
    rows_in_folder: int
    rows_without_person: int
    rows_normalised: int  # rows scaled to unit norm (outside NORM_TOLERANCE)
    dtype: str  # of the shards (the first one's; each shard says its own)
    duplicates: list[DuplicatePhoto] = field(default_factory=list)  # rows left out: a person's sha256 again

    def summary(self, declared_model: str) -> dict:
        """summary.json's `embeddings` section."""
        return {"folder": str(self.folder), "declared_model": declared_model, "verified": False,
                "note": UNVERIFIED, "person_column": self.person_column, "rows_in_folder": self.rows_in_folder,
                "rows_used": len(self.rows), "rows_without_person": self.rows_without_person,
                "rows_duplicate_photo": len(self.duplicates),
                "rows_normalised": self.rows_normalised, "norm_tolerance": NORM_TOLERANCE,
                "dtype": self.dtype, "shards": len(self.images.shards)}


def read_embedded_photos(source: EmbeddingsInput, info: ModelInfo, dim: int, index_dir: Path) -> EmbeddedPhotos:
    """Open and check a folder of embeddings against the index (its model `info`, dimension `dim`): every file,
    every person, every row's norm; raise InputError (one line) for anything wrong. Reads metadata columns
    and streams the embeddings once; nothing is written."""
    check_declared_model(source.model, info, index_dir)
    folder = _layout_folder(Path(source.folder), info)
    shards = read_shards(folder, IMAGE_EMBEDDINGS)
    if shards[0].dim != dim:
        raise InputError(f"--embeddings: {shards[0].embeddings} holds {shards[0].dim}-dimensional embeddings, index "
                         f"{index_dir} {dim}-dimensional ones (model {info.model}); they are not of its model")
    columns = column_names(shards[0])
    person_column = source.person_column.strip() if source.person_column else (
        NAME_COLUMN if NAME_COLUMN in columns else PATH_COLUMN if PATH_COLUMN in columns else None)
    if person_column is None:
        raise InputError(f"--embeddings: {shards[0].metadata} has neither a {NAME_COLUMN!r} nor an {PATH_COLUMN!r} "
                         f"column (its columns: {', '.join(columns)}); name the column that holds each row's person "
                         "with --embeddings-person-column")
    from_path = source.person_column is None and person_column == PATH_COLUMN
    by_person: dict[str, list[tuple[str, str, int]]] = {}
    spelt: dict[str, tuple[str, str]] = {}  # name_key -> (name, where first seen)
    without_person = 0
    first_with_sha: dict[tuple[str, str], str] = {}  # (person, sha256) -> the path of its first row
    duplicates: list[DuplicatePhoto] = []
    for shard in shards:
        for i, (person, path, sha) in enumerate(_shard_rows(shard, person_column, from_path, info)):
            if person is None:
                without_person += 1
                continue
            where = f"{shard.metadata} row {i}"
            check_name(person, where=where)
            first, first_where = spelt.setdefault(name_key(person), (person, where))
            if first != person:
                raise InputError(f"{where}: person {person!r} differs only in letter case from {first!r} "
                                 f"({first_where}); write one person's name the same way on every row")
            if sha:  # one photo, one vote: the same bytes again for this person are left out
                if (person, sha) in first_with_sha:
                    duplicates.append(DuplicatePhoto(person, first_with_sha[person, sha], path, sha))
                    continue
                first_with_sha[person, sha] = path
            by_person.setdefault(person, []).append((path, sha, shard.start + i))
    if not by_person:
        raise InputError(f"--embeddings {folder}: no row names a person in column {person_column!r}; name the "
                         "column that does with --embeddings-person-column")
    persons = dict(sorted(by_person.items()))
    rows = [(p, path, sha) for p, items in persons.items() for path, sha, _ in items]
    order = np.array([g for items in persons.values() for _, _, g in items], np.int64)
    images = ShardRows(shards, order)
    return EmbeddedPhotos(folder, {p: [path for path, _, _ in items] for p, items in persons.items()}, rows, images,
                          person_column, shards[-1].start + shards[-1].rows, without_person, images.check(),
                          shards[0].dtype, duplicates)


def _layout_folder(folder: Path, info: ModelInfo) -> Path:
    """The folder holding img_emb/: the one given, or the images/ of an `idia-engine export`, whose sidecar must
    then name the index's model."""
    sidecar = folder / EXPORT_SIDECAR
    if (folder / IMAGE_EMBEDDINGS).is_dir() or not sidecar.is_file():
        return folder
    try:
        export = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"--embeddings: {sidecar} cannot be read ({str(e).splitlines()[0]})") from None
    if not isinstance(export, dict) or export.get("artifact") != EXPORT_ARTIFACT:
        return folder
    images = export.get("images")
    if not isinstance(images, dict):
        raise InputError(f"--embeddings: export {folder} holds no image embeddings (it was exported without an "
                         "image store); export again with --store or --report")
    fingerprint = (images.get("model") or {}).get("fingerprint") if isinstance(images.get("model"), dict) else None
    if fingerprint != info.fingerprint:
        raise InputError(f"--embeddings: export {folder} holds image embeddings of model fingerprint "
                         f"{str(fingerprint)[:12]}, the index's model has {info.fingerprint[:12]}; they are not of "
                         "its model")
    return folder / EXPORT_IMAGES


def _shard_rows(shard: Shard, person_column: str, from_path: bool, info: ModelInfo
                ) -> Iterator[tuple[str | None, str, str]]:
    """(person or None, path, sha256 or "") of each row of a shard."""
    names = column_names(shard)
    wanted = [person_column] + [c for c in (PATH_COLUMN, SHA_COLUMN, FINGERPRINT_COLUMN)
                                if c in names and c != person_column]
    table = read_columns(shard, wanted)
    for column in wanted:
        kind = table.schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise InputError(f"--embeddings: column {column!r} of {shard.metadata} holds {kind} values; expected "
                             "text")
    values = {c: table.column(c).to_pylist() for c in wanted}
    if FINGERPRINT_COLUMN in values:
        other = next((v for v in values[FINGERPRINT_COLUMN] if v is not None and v != info.fingerprint), None)
        if other is not None:
            raise InputError(f"--embeddings: {shard.metadata} has rows of model fingerprint {other[:12]} (column "
                             f"{FINGERPRINT_COLUMN}), the index's model has {info.fingerprint[:12]}; they are not "
                             "of its model")
    paths = values.get(PATH_COLUMN) or [None] * shard.rows
    shas = values.get(SHA_COLUMN) or [None] * shard.rows
    for i, raw in enumerate(values[person_column]):
        path = paths[i] or f"{shard.embeddings.parent.name}/{shard.embeddings.name}[{i}]"
        if from_path:
            person = person_name_from_folder(Path(raw).parent.name) if raw else None
        else:
            person = normalize_name(raw) if raw is not None else None
        yield (person or None), path, shas[i] or ""


class ShardRows:
    """Chosen rows of a folder's shards, in a given order, as unit float32 rows (`search.QueryEmbeddings`)."""

    def __init__(self, shards: list[Shard], order: np.ndarray):
        self.shards = shards
        self.order = order  # int64 [M]: the global row (over all shards, in shard order) of each report row
        self._starts = np.array([s.start for s in shards], np.int64)

    def __len__(self) -> int:
        return len(self.order)

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self.order), size):
            yield start, _unit_rows(self._gather(self.order[start:start + size]))[0]

    def check(self) -> int:
        """Refuse a row that is not finite or has norm 0; return how many rows `chunks` scales to unit norm."""
        scaled = 0
        for start in range(0, len(self.order), _CHECK_CHUNK):
            rows = self.order[start:start + _CHECK_CHUNK]
            x = self._gather(rows)
            bad = _first_unusable(x)
            if bad is not None:
                shard = self.shards[int(np.searchsorted(self._starts, rows[bad], side="right")) - 1]
                raise InputError(f"--embeddings: row {int(rows[bad] - shard.start)} of {shard.embeddings} is not a "
                                 "usable embedding (a value that is not finite, or all zeros)")
            scaled += _unit_rows(x)[1]
        return scaled

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), D] of the given global rows (memory-mapped reads, one shard at a time)."""
        out = np.empty((len(rows), self.shards[0].dim), np.float32)
        which = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(which):
            mask = which == s
            shard = self.shards[s]
            out[mask] = open_rows(shard)[rows[mask] - shard.start]
        return out


def _first_unusable(x: np.ndarray) -> int | None:
    """The first row with a value that is not finite, or with norm 0 (None if every row is usable)."""
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    return int(bad[0]) if len(bad) else None


def _unit_rows(x: np.ndarray) -> tuple[np.ndarray, int]:
    """(rows, how many were scaled): rows within NORM_TOLERANCE of unit norm as they are, the others scaled to
    unit norm in float64."""
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    off = np.abs(norms - 1) > NORM_TOLERANCE
    if off.any():
        x = x.copy()
        x[off] = (x[off].astype(np.float64) / norms[off, None]).astype(np.float32)
    return x, int(off.sum())
