"""Finding the photos of each person, and decoding them for the image encoder.

Two layouts are accepted:
- a faces folder, `faces/<Person Name>/<image files>` (sub-folders included); the folder name is the
  person's name with `_` read as a space, NFC-normalised;
- a CSV with columns `path,name` (paths relative to the CSV file, or absolute).

Any file Pillow opens is an image (jpg, png, webp, bmp, gif: first frame, ...); it is converted to RGB.
A file that cannot be read or decoded is skipped with a reason; the run goes on.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageFile

from ..candidates.names_file import check_name, normalize_name
from ..disk.textfiles import iter_csv_rows
from ..errors import InputError


@dataclass(frozen=True)
class Skipped:
    """A file that was not used, and why."""

    path: str
    reason: str


@dataclass
class ImageCollection:
    """The photos of every person, by canonical name (sorted), and the files that were skipped."""

    persons: dict[str, list[Path]]
    skipped: list[Skipped] = field(default_factory=list)
    source: str = ""


def person_name_from_folder(folder_name: str) -> str:
    return normalize_name(folder_name.replace("_", " "))


def name_key(name: str) -> str:
    """Names equal under this key are one person spelt two ways ("Anna Smith" / "anna smith"): refused, since
    file systems that ignore case would merge their folders and CLIP's tokenizer lower-cases prompts."""
    return unicodedata.normalize("NFC", name.casefold())


def collect_from_folder(faces_dir: Path) -> ImageCollection:
    faces_dir = Path(faces_dir)
    if not faces_dir.exists():
        raise InputError(f"faces folder {faces_dir} does not exist")
    if not faces_dir.is_dir():
        raise InputError(f"faces folder {faces_dir} is not a directory; give faces/<Person Name>/<images>")
    persons: dict[str, list[Path]] = {}
    folder_of: dict[str, str] = {}  # casefolded name -> folder
    skipped: list[Skipped] = []
    try:
        entries = sorted(faces_dir.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise InputError(f"faces folder {faces_dir} cannot be listed ({e.strerror or e}); give a readable folder") from None
    for entry in entries:
        if not entry.is_dir():
            skipped.append(Skipped(str(entry), "not inside a person folder (expected faces/<Person Name>/<image>)"))
            continue
        name = person_name_from_folder(entry.name)
        check_name(name, where=f"person folder {entry}")
        key = name_key(name)
        if key in folder_of:
            other = person_name_from_folder(folder_of[key])
            what = f"both name {name!r}" if other == name else \
                f"name {other!r} and {name!r}, which differ only in letter case"
            raise InputError(f"person folders {faces_dir / folder_of[key]} and {entry} {what}; merge or rename one")
        folder_of[key] = entry.name
        files: list[Path] = []
        for root, dirs, filenames in os.walk(entry, followlinks=False):
            dirs.sort()
            for fn in sorted(filenames):
                files.append(Path(root) / fn)
        persons[name] = files
    if not persons:
        raise InputError(f"faces folder {faces_dir} holds no person folder; expected faces/<Person Name>/<images>")
    return ImageCollection(dict(sorted(persons.items())), skipped, source=str(faces_dir))


def collect_from_csv(csv_path: Path) -> ImageCollection:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"image manifest {csv_path} does not exist or is not a file")
    persons: dict[str, list[Path]] = {}
    first_seen: dict[str, tuple[str, int]] = {}  # casefolded name -> (name as written, line)
    for lineno, row in iter_csv_rows(csv_path, ("path", "name"), "image manifest"):
        raw_path, raw_name = (row.get("path") or "").strip(), (row.get("name") or "")
        if not raw_path:
            raise InputError(f"{csv_path}:{lineno}: empty path; give the image file, relative to the CSV or absolute")
        name = normalize_name(raw_name)
        check_name(name, where=f"{csv_path}:{lineno}")
        other, other_line = first_seen.setdefault(name_key(name), (name, lineno))
        if other != name:
            raise InputError(f"{csv_path}:{lineno}: name {name!r} differs only in letter case from {other!r} "
                             f"(line {other_line}); write one person's name the same way on every line")
        p = Path(raw_path)
        persons.setdefault(name, []).append(p if p.is_absolute() else csv_path.parent / p)
    if not persons:
        raise InputError(f"image manifest {csv_path} lists no image")
    return ImageCollection(dict(sorted(persons.items())), [], source=str(csv_path))


def sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def hash_images(paths: list[Path]) -> tuple[list[str | None], list[Skipped]]:
    """SHA-256 of each file's bytes (None when unreadable or empty), and the reasons for the Nones."""
    out: list[str | None] = []
    skipped: list[Skipped] = []
    for p in paths:
        try:
            if p.stat().st_size == 0:
                out.append(None)
                skipped.append(Skipped(str(p), "empty file (0 bytes)"))
                continue
            out.append(sha256_of_file(p))
        except OSError as e:
            out.append(None)
            skipped.append(Skipped(str(p), f"cannot read: {e.strerror or e}"))
    return out, skipped


def load_rgb(path: Path) -> Image.Image:
    """Open an image with Pillow, first frame, converted to RGB. Raises on anything undecodable."""
    with warnings.catch_warnings():
        # Pillow only warns between its pixel limit and twice that, and errors beyond. Past the limit is a
        # decompression bomb here either way: refusing it costs nothing, decoding it can cost gigabytes.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.seek(0)
            img.load()
            return as_rgb(img)


def as_rgb(img: Image.Image) -> Image.Image:
    """A decoded image converted to RGB as every photo is (a new image; the given one is left as it is)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bit first
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    """(path, sha256) items -> (preprocessed pixels or None, sha256, path, error or None).

    An item may hold a PIL image already in memory instead of a path (the Python API's photos); it goes
    through the same RGB conversion and preprocessing as a decoded file. Decoding runs in DataLoader
    workers; nothing here touches the LMDB store (an LMDB environment must not cross a fork).
    """

    def __init__(self, items: list[tuple[Path | Image.Image, str]], preprocess: Callable):
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, sha = self.items[i]
        try:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            pixels = self.preprocess(as_rgb(path) if isinstance(path, Image.Image) else load_rgb(path))
            return pixels, sha, str(path), None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return None, sha, str(path), f"decompression bomb refused by Pillow ({e})"
        except Exception as e:  # noqa: BLE001 - any decoder failure skips this file only
            return None, sha, str(path), f"not a decodable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def collate_images(batch):
    """-> (stacked pixels or None, their sha256s, {sha256: reason} of the files that failed to decode)."""
    ok = [b for b in batch if b[0] is not None]
    failed = {b[1]: b[3] for b in batch if b[0] is None}
    pixels = torch.stack([b[0] for b in ok]) if ok else None
    return pixels, [b[1] for b in ok], failed
