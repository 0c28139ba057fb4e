"""--faces-list FILE: a FaceScrub-style list of every face, with the SHA-256 of the file it was cut from.

Tab-separated, with a header holding (in any order) `name image_id face_id url bbox sha256`, as FaceScrub's
facescrub_actors.txt and facescrub_actresses.txt do, and optionally `path`. `bbox` is `x1,y1,x2,y2` in
pixels (whole numbers); `sha256` is of the downloaded image file; `url` is not read.

Each line's file is looked for under the faces folders, in the order given, the first found winning; with
N the name as listed with spaces as `_`:
- `<root>/N/N_<face_id>.<ext>`: MegaFace's FaceScrub layout (one file per face id);
- `<root>/images/N/N_<image_id>.<ext>`: what the FaceScrub authors' downloader saves (one file per image);
with `<ext>` one of FILE_EXTENSIONS, in that order. A non-empty `path` cell names the file instead (relative
to the list, or absolute).

A file whose bytes do not have the listed SHA-256 (another image under that URL since, a re-encoded copy) is
skipped with the reason "sha256 differs from the faces list", a line whose file is nowhere found is skipped
with where it was looked for; both are in summary.json's skipped files like every other skip. A malformed
line is an InputError naming file:line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ...candidates.names_file import check_name, normalize_name
from ...disk.textfiles import decode_utf8, read_input_bytes
from ...errors import InputError
from ..images import Skipped, name_key, sha256_of_file
from .crop import FaceBox

FACES_LIST_COLUMNS = ("name", "image_id", "face_id", "url", "bbox", "sha256")
PATH_COLUMN = "path"
FILE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp")
SHA256_DIFFERS = "sha256 differs from the faces list"

_WHOLE = re.compile(r"[0-9]+")
_BOX = re.compile(r"\s*(-?[0-9]+)\s*,\s*(-?[0-9]+)\s*,\s*(-?[0-9]+)\s*,\s*(-?[0-9]+)\s*")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class FaceLine:
    """One face of the list."""

    line: int  # in the file
    name: str  # NFC, stripped
    image_id: int
    face_id: int
    box: FaceBox
    sha256: str  # lower-case hex
    path: Path | None  # the `path` cell, resolved against the list's folder; None: looked for under the roots


@dataclass(frozen=True)
class ListedPhotos:
    """The faces of one list that were found with the listed bytes, per name in list order."""

    persons: dict[str, list[tuple[Path, FaceBox]]]  # name as listed -> (file, face box) per usable line
    skipped: list[Skipped]  # lines not found, files whose bytes differ or cannot be read
    lines: int  # faces listed
    not_found: int
    sha256_differs: int


def read_faces_list(path: Path) -> list[FaceLine]:
    """Every face line; InputError naming file:line for a missing column, a wrong number of fields, a bad id,
    box or SHA-256, or one name spelt in two letter cases."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"faces list {path} does not exist or is not a file")
    text = decode_utf8(read_input_bytes(path, "faces list"), path, "faces list")
    lines = text.split("\n")
    header_at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if header_at is None:
        raise InputError(f"faces list {path} is empty; expected a tab-separated header {' '.join(FACES_LIST_COLUMNS)}")
    header = [h.strip() for h in lines[header_at].rstrip("\r").split("\t")]
    missing = [c for c in FACES_LIST_COLUMNS if c not in header]
    if missing:
        raise InputError(f"{path}:{header_at + 1}: faces list has no column {missing[0]!r}; expected a tab-separated "
                         f"header {' '.join(FACES_LIST_COLUMNS)} [path] (found {' '.join(header) or 'none'})")
    column = {c: header.index(c) for c in (*FACES_LIST_COLUMNS, PATH_COLUMN) if c in header}
    faces: list[FaceLine] = []
    spelt: dict[str, tuple[str, int]] = {}  # name key -> (name as first written, its line)
    for i in range(header_at + 1, len(lines)):
        raw = lines[i].rstrip("\r")
        if not raw.strip():
            continue
        where = f"{path}:{i + 1}"
        cells = raw.split("\t")
        if len(cells) != len(header):
            raise InputError(f"{where}: {len(cells)} tab-separated fields, the header has {len(header)} "
                             f"({' '.join(header)})")
        face = _face_line(i + 1, {c: cells[j] for c, j in column.items()}, path.parent, where)
        first, first_line = spelt.setdefault(name_key(face.name), (face.name, face.line))
        if first != face.name:
            raise InputError(f"{where}: name {face.name!r} differs only in letter case from {first!r} (line "
                             f"{first_line}); write one person's name the same way on every line")
        faces.append(face)
    if not faces:
        raise InputError(f"faces list {path} lists no face")
    return faces


def _face_line(line: int, cell: dict[str, str], folder: Path, where: str) -> FaceLine:
    name = normalize_name(cell["name"])
    check_name(name, where=where)
    ids = {}
    for column in ("image_id", "face_id"):
        value = cell[column].strip()
        if not _WHOLE.fullmatch(value):
            raise InputError(f"{where}: {column} {cell[column]!r} is not a whole number >= 0")
        ids[column] = int(value)
    box = _BOX.fullmatch(cell["bbox"])
    if box is None:
        raise InputError(f"{where}: bbox {cell['bbox']!r} is not x1,y1,x2,y2 (four whole numbers, in pixels)")
    sha = cell["sha256"].strip()
    if not _SHA256.fullmatch(sha):
        raise InputError(f"{where}: sha256 {cell['sha256']!r} is not 64 hex digits (the SHA-256 of the image file)")
    raw_path = cell.get(PATH_COLUMN, "").strip()
    path = None if not raw_path else (Path(raw_path) if Path(raw_path).is_absolute() else folder / raw_path)
    return FaceLine(line, name, ids["image_id"], ids["face_id"], FaceBox(*(int(v) for v in box.groups())),
                    sha.lower(), path)


def candidate_paths(face: FaceLine, roots: list[Path]) -> list[Path]:
    """Where a face's file may be, in the order looked at (see the module docstring)."""
    if face.path is not None:
        return [face.path]
    folder = face.name.replace(" ", "_")
    return [p for root in roots
            for stem in (root / folder / f"{folder}_{face.face_id}", root / "images" / folder / f"{folder}_{face.image_id}")
            for p in (stem.with_name(f"{stem.name}.{ext}") for ext in FILE_EXTENSIONS)]


def find_listed_photos(list_path: Path, faces: list[FaceLine], roots: list[Path]) -> ListedPhotos:
    """Each face's file, found under the roots and checked against the listed SHA-256."""
    persons: dict[str, list[tuple[Path, FaceBox]]] = {}
    skipped: list[Skipped] = []
    not_found = differs = 0
    for face in faces:
        persons.setdefault(face.name, [])
        found = next((p for p in candidate_paths(face, roots) if p.is_file()), None)
        if found is None:
            not_found += 1
            folder = face.name.replace(" ", "_")
            looked = (str(face.path) if face.path is not None else
                      f"{folder}/{folder}_{face.face_id}.<ext> or images/{folder}/{folder}_{face.image_id}.<ext> "
                      f"under {', '.join(str(r) for r in roots)} (<ext>: {'/'.join(FILE_EXTENSIONS)})")
            skipped.append(Skipped(f"{list_path}:{face.line}", f"listed face {face.face_id} of {face.name!r} not "
                                                               f"found: looked for {looked}"))
            continue
        try:
            sha = sha256_of_file(found)
        except OSError as e:
            skipped.append(Skipped(str(found), f"cannot read: {e.strerror or e}"))
            continue
        if sha != face.sha256:
            differs += 1
            skipped.append(Skipped(str(found), SHA256_DIFFERS))
            continue
        persons[face.name].append((found, face.box))
    return ListedPhotos(persons, skipped, len(faces), not_found, differs)
