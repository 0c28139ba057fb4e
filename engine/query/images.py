"""Finding the photos of each person, and decoding them for the image encoder.

Two layouts are accepted:
- a faces folder, `faces/<Person Name>/<image files>` (sub-folders included); the folder name is the
  person's name with `_` read as a space, NFC-normalised;
- a CSV with columns `path,name` (paths relative to the CSV file, or absolute).

Any file Pillow opens is an image (jpg, png, webp, bmp, gif: first frame, ...); it is turned upright by its
EXIF orientation (the photo as a person sees it) and converted to RGB. A file that cannot be read or decoded
is skipped with a reason; the run goes on.

One photo, one vote: files of one person with the same bytes (copies under two names, a manifest line
listed twice, a symlink) are one photo; the first in listing order is kept (`choose_photos`).

A file is hashed and decoded from one read of its bytes (`read_photo`), and the decode checks that they
still have the SHA-256 the store is keyed by: a file replaced in between is skipped for this run, never
stored under the other bytes' hash. Only failures the bytes themselves determine (do not decode, a
decompression bomb) may be remembered by the store; a read that failed (the file vanished, became
unreadable, changed) is `retry` and is tried again by the next run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from ..candidates.names_file import check_name, name_hash64, normalize_name
from ..disk.textfiles import iter_csv_rows
from ..errors import InputError

log = logging.getLogger(__name__)

# How file bytes become the pixels the model sees; part of the store's key (`run.image_fingerprint`), so
# embeddings made by another decoding are never reused. 1: pixels as stored; 2: EXIF orientation applied.
DECODE_VERSION = 2
# A file larger than this is not read as a photo: the decode holds a file's bytes in memory, and a video or
# disk image dropped among the photos should not cost gigabytes. Pillow's pixel limit (about 89 Mpx) caps a
# real photo far below it (an uncompressed 16-bit RGBA TIFF at the limit is about 0.7 GiB).
MAX_PHOTO_BYTES = 1 << 30


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
            size = p.stat().st_size
            if size == 0:
                out.append(None)
                skipped.append(Skipped(str(p), "empty file (0 bytes)"))
                continue
            if size > MAX_PHOTO_BYTES:
                out.append(None)
                skipped.append(Skipped(str(p), f"file of {size} bytes is larger than a photo may be "
                                               f"({MAX_PHOTO_BYTES} bytes)"))
                continue
            out.append(sha256_of_file(p))
        except OSError as e:
            out.append(None)
            skipped.append(Skipped(str(p), f"cannot read: {e.strerror or e}"))
    return out, skipped


@dataclass(frozen=True)
class DuplicatePhoto:
    """A file not used because an earlier photo of the same person has the same bytes (one photo, one vote)."""

    person: str  # whose photos both files are
    kept: str  # the copy used: the first in listing order among the person's files drawn
    dropped: str  # the copy left out (may be the same path, listed twice in a manifest)
    sha256: str  # the bytes both have


@dataclass(frozen=True)
class ChosenPhotos:
    """One person's photos for this run: distinct by content, all of them or a seeded subset."""

    paths: list[Path]  # in listing order
    shas: list[str | None]  # SHA-256 of each path's bytes; None: unreadable (its reason is in `unreadable`)
    unreadable: list[Skipped]  # the chosen files that could not be hashed, and why
    duplicates: list[DuplicatePhoto]  # files left out as copies of a kept photo


def choose_photos(person: str, paths: list[Path], n: int | None, seed: int,
                  photo_key: Callable[[int, str], str] | None = None) -> ChosenPhotos:
    """A person's distinct photos: all of them (n None), or a seeded random n, kept in listing order.

    `photo_key(i, sha)` is what photo i (whose file has SHA-256 `sha`) is known by; `shas` and the copies
    found are then of these keys. Default: the SHA-256 itself (a photo is a file's bytes); a face box of the
    file makes it another photo (`inputs/crop.py`).

    Files with the same SHA-256 are one photo: the first in listing order (faces folder: os.walk order, the
    person folder's files by name, then each sub-folder's, by name; manifest: line order) is kept, the others
    are `duplicates`. An unreadable file counts as a photo of its own (it is skipped later, with its reason).

    With n, the files drawn are those of `rng.choice(len, n, replace=False)` (seeded by (seed, name)); where
    copies among them leave fewer than n distinct photos, more files are drawn, in a seeded permutation of the
    rest, until n are distinct or none is left. So a person's draw depends only on the seed, the name and the
    files' bytes, and is the plain seeded draw where no copies are drawn. Only drawn files are hashed.
    """
    want = len(paths) if n is None else min(n, len(paths))
    order = list(range(len(paths)))
    if want < len(paths):
        rng = np.random.default_rng([seed, name_hash64(person)])
        drawn = sorted(int(i) for i in rng.choice(len(paths), size=want, replace=False))
        taken = set(drawn)
        order = drawn + [int(i) for i in rng.permutation(len(paths)) if int(i) not in taken]
    sha_of: dict[int, str | None] = {}
    unreadable: dict[int, Skipped] = {}
    first_with: dict[str, int] = {}  # sha -> the earliest listed file with those bytes, among those hashed
    done = 0
    while done < len(order) and len(first_with) + len(unreadable) < want:
        batch = order[done:done + want - len(first_with) - len(unreadable)]
        done += len(batch)
        shas, reasons = hash_images([paths[i] for i in batch])
        if photo_key is not None:
            shas = [None if sha is None else photo_key(i, sha) for i, sha in zip(batch, shas)]
        why = iter(reasons)  # one reason per None, in order
        for i, sha in zip(batch, shas):
            sha_of[i] = sha
            if sha is None:
                unreadable[i] = next(why)
            elif i < first_with.get(sha, len(paths)):
                first_with[sha] = i
    kept = sorted(set(first_with.values()) | set(unreadable))
    duplicates = [DuplicatePhoto(person, str(paths[first_with[sha]]), str(paths[i]), sha)
                  for i, sha in sorted(sha_of.items()) if sha is not None and i != first_with[sha]]
    return ChosenPhotos([paths[i] for i in kept], [sha_of[i] for i in kept],
                        [unreadable[i] for i in kept if i in unreadable], duplicates)


class _ChangedSinceHashed(Exception):
    """The bytes read to decode a file are not those its SHA-256 was taken of: it changed in between."""


def read_photo(path: Path) -> tuple[bytes, str]:
    """(the file's bytes, their SHA-256) from one read, at most MAX_PHOTO_BYTES + 1 bytes of it.

    The decode and the store key come from these same bytes. OSError when the file cannot be read."""
    with open(path, "rb") as f:
        data = f.read(MAX_PHOTO_BYTES + 1)
    return data, hashlib.sha256(data).hexdigest()


class _FileBytes(io.BytesIO):
    """A photo file's bytes as Pillow reads them. Pillow's errors name the file object by its repr: this one
    says the same every run (a BytesIO's repr holds a memory address, which would make the reasons in
    summary.json and in the store differ between runs)."""

    def __repr__(self) -> str:
        return "(the file's bytes)"


def decode_rgb(data: bytes) -> Image.Image:
    """The photo in `data` as a person sees it: first frame, EXIF orientation applied, RGB. Raises on
    anything undecodable (from these bytes alone: nothing here reads a file)."""
    with warnings.catch_warnings():
        # Pillow only warns between its pixel limit and twice that, and errors beyond. Past the limit is a
        # decompression bomb here either way: refusing it costs nothing, decoding it can cost gigabytes.
        # Image.open reads the header only, so the limit is checked before any pixel is decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # Pillow warns (UserWarning) of metadata it cannot parse, such as a corrupt EXIF block: the pixels
        # decode or raise regardless, and the warning would be a stray unformatted line on stderr.
        warnings.simplefilter("ignore", UserWarning)
        with Image.open(_FileBytes(data)) as img:
            check_photo_shape(img)  # from the header, before any pixel is decoded
            img.seek(0)
            img.load()
            return as_rgb(upright(img))


# Preprocessing scales a photo's shorter side to the model's input size (224 px), so its cost grows with the
# aspect ratio, not the file size: a 1,248-byte PNG of 400,000 x 1 pixels is under Pillow's pixel limit and
# would become 89,600,000 x 224 pixels (3.3 GB in preprocessing). No photo of a person is that shape; 20:1 is
# wider than a phone's panorama, and bounds a preprocessed photo to 224 x 4,480 pixels.
MAX_ASPECT_RATIO = 20


class PhotoShapeError(ValueError):
    """A photo whose header gives a shape no photo of a person has (skipped with this as its reason)."""


def check_photo_shape(img: Image.Image) -> Image.Image:
    """Raise PhotoShapeError for an image of more than MAX_ASPECT_RATIO:1 (its size is read from the header)."""
    width, height = img.size
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise PhotoShapeError(f"{width} x {height} pixels is not the shape of a photo (at most "
                              f"{MAX_ASPECT_RATIO}:1 is read, since preprocessing cost grows with the ratio)")
    return img


def load_rgb(path: Path) -> Image.Image:
    """Open an image file: first frame, upright by its EXIF orientation, RGB. Raises on anything undecodable
    (OSError too when the file cannot be read)."""
    return decode_rgb(read_photo(path)[0])


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (all 8 orientations; phones store photos sideways
    and set the tag): the photo as a viewer shows it. A new image; the given one is left as it is.

    An orientation Pillow cannot read (a malformed EXIF block) leaves the pixels as stored, as viewers do;
    Pillow's "Corrupt EXIF data" warning is not passed on (it would be a stray line on stderr per photo)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - a broken EXIF block does not make the pixels undecodable
        log.debug("EXIF orientation of an image could not be read (%s: %s); using the pixels as stored",
                  type(e).__name__, e)
        return img.copy()


def as_rgb(img: Image.Image) -> Image.Image:
    """A decoded image converted to RGB as every photo is (a new image; the given one is left as it is)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bit first
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


class DecodedItem(NamedTuple):
    """One item of ImageDataset."""

    pixels: torch.Tensor | None  # preprocessed [3, H, W]; None when the photo could not be used
    key: str  # the item's key as given (the SHA-256 the file had when hashed, for the store)
    path: str  # the path (or repr of the in-memory image)
    error: str | None  # why the photo could not be used
    retry: bool  # the failure was the read's (vanished, unreadable, changed), not the bytes': do not remember it


class ImageDataset(torch.utils.data.Dataset):
    """(path, key) items -> DecodedItem (pixels or None, key, path, error or None, retry).

    A file is read once; its bytes are decoded from memory. With `keys_are_sha256` (query's store keys),
    those bytes must still have the SHA-256 given as the key, else the file changed after it was hashed and
    is skipped with `retry` set (so the store never holds one photo's embedding under another's hash). An
    item may hold a PIL image already in memory instead of a path (the Python API's photos); it goes
    through the same orientation, RGB conversion and preprocessing as a decoded file. Decoding runs in
    DataLoader workers; nothing here touches the LMDB store (an LMDB environment must not cross a fork).
    """

    def __init__(self, items: list[tuple[Path | Image.Image, str]], preprocess: Callable,
                 keys_are_sha256: bool = False):
        self.items = items
        self.preprocess = preprocess
        self.keys_are_sha256 = keys_are_sha256

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> DecodedItem:
        source, key = self.items[i]
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        if isinstance(source, Image.Image):
            return self._preprocessed(lambda: as_rgb(upright(check_photo_shape(source))), key, str(source))
        try:
            data, sha = read_photo(source)
        except OSError as e:  # for query: vanished or became unreadable after it was listed and hashed
            later = " (after it was hashed; tried again on the next run)" if self.keys_are_sha256 else ""
            return DecodedItem(None, key, str(source), f"cannot read: {e.strerror or e}{later}", True)
        if self.keys_are_sha256 and sha != key:
            return DecodedItem(None, key, str(source), "changed while the run read it (its bytes no longer have "
                               f"the SHA-256 {key[:16]}... they had when hashed); tried again on the next run", True)
        return self._preprocessed(lambda: decode_rgb(data), key, str(source))

    def _preprocessed(self, decode: Callable[[], Image.Image], key: str, path: str) -> DecodedItem:
        """Decode and preprocess; a failure here is the bytes' own (the file was already read)."""
        try:
            return DecodedItem(self.preprocess(decode()), key, path, None, False)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return DecodedItem(None, key, path, f"decompression bomb refused by Pillow ({e})", False)
        except PhotoShapeError as e:
            return DecodedItem(None, key, path, str(e), False)
        except MemoryError:  # depends on this machine's memory now, not on the bytes alone
            return DecodedItem(None, key, path, "out of memory while decoding; tried again on the next run", True)
        except Exception as e:  # noqa: BLE001 - any decoder failure skips this file only
            text = str(e).splitlines()[0] if str(e) else ""
            return DecodedItem(None, key, path, f"not a decodable image ({type(e).__name__}: {text})", False)


def collate_images(batch: list[DecodedItem]):
    """-> (stacked pixels or None, their keys, {key: reason} of every photo that could not be used)."""
    pixels, keys, remembered, retried = collate_for_store(batch)
    return pixels, keys, {**remembered, **retried}


def collate_for_store(batch: list[DecodedItem]):
    """-> (stacked pixels or None, their keys, {key: reason} of the bytes that do not decode (the store
    remembers these), {key: reason} of the files whose read failed or changed (retried next run))."""
    ok = [b for b in batch if b.pixels is not None]
    remembered = {b.key: b.error for b in batch if b.pixels is None and not b.retry}
    retried = {b.key: b.error for b in batch if b.pixels is None and b.retry}
    pixels = torch.stack([b.pixels for b in ok]) if ok else None
    return pixels, [b.key for b in ok], remembered, retried
