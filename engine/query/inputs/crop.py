"""--crop: each photo is the face box a faces list gives for it, cut out before the model's preprocessing.

A cropped photo is other pixels than its file, so its embedding lives apart from the file's in the store:
in a namespace of its own (`crop_fingerprint`: the image fingerprint plus CROP_VERSION), under a key made
of the file's SHA-256 and the box (`crop_key`). The same file with two boxes is two photos; the same file and
box listed twice is one (one photo, one vote, as for files). An uncropped run never reads a crop's
embedding, nor a cropped run a file's.

The box is `x1,y1,x2,y2` in pixels of the photo as a viewer shows it (EXIF orientation applied, as every
photo is; FaceScrub's files carry no rotation), x2 and y2 exclusive, as Pillow's `Image.crop` and the
FaceScrub authors' downloader cut it. A box reaching past the photo's edge is clipped to the photo (the
pixels it has; no padding the photo never had); a box with no pixel of the photo in it (wholly outside, or
empty) skips the photo with that reason, as does a crop of more than 20:1 (`images.MAX_ASPECT_RATIO`).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from ..images import DecodedItem, ImageDataset, PhotoShapeError, check_photo_shape, decode_rgb, read_photo

# How a photo is cut from its file; part of the store namespace, so a change to the cut never reuses old crops.
CROP_VERSION = 1
CROPS_CSV = "predictions/crops.csv"
CROPS_CSV_DESCRIPTION = ("with --crop: row,name,path,file_sha256,box per image row of images.csv (whose sha256 "
                         "is then the crop's store key: SHA-256 of the file's SHA-256 and the box)")


@dataclass(frozen=True)
class FaceBox:
    """A face's box in pixels: [x1, x2) x [y1, y2), as listed (before clipping to the photo)."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def text(self) -> str:
        return f"{self.x1},{self.y1},{self.x2},{self.y2}"

    def clipped(self, width: int, height: int) -> tuple[int, int, int, int] | None:
        """The box cut to a width x height photo; None when no pixel of it is left."""
        x1, y1 = max(self.x1, 0), max(self.y1, 0)
        x2, y2 = min(self.x2, width), min(self.y2, height)
        return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


class FaceBoxError(PhotoShapeError):
    """A face box with no pixel of its photo: the photo is skipped with this as its reason. The bytes and the
    box decide it, so the store may remember it (under the crop's key)."""


def crop_face(img: Image.Image, box: FaceBox) -> Image.Image:
    """The face cut out of an upright RGB photo (a new image), clipped to the photo."""
    clipped = box.clipped(*img.size)
    if clipped is None:
        raise FaceBoxError(f"face box {box.text} holds no pixel of the {img.size[0]} x {img.size[1]} photo")
    return check_photo_shape(img.crop(clipped))


def crop_key(file_sha256: str, box: FaceBox) -> str:
    """The store key of a cropped photo: hex SHA-256 of the file's SHA-256 and the box as listed."""
    return hashlib.sha256(f"{file_sha256}|crop|{box.text}".encode()).hexdigest()


def crop_fingerprint(image_fingerprint: str) -> str:
    """The store namespace of cropped photos, beside (never equal to) the namespace of whole files."""
    return hashlib.sha256(f"{image_fingerprint}|crop{CROP_VERSION}".encode()).hexdigest()


@dataclass
class CropPlan:
    """Each person's face boxes, parallel to the collection's photos; and, once photos are hashed, what every
    crop key stands for."""

    boxes: dict[str, list[FaceBox]]  # person -> box of each of their photos, in the collection's order
    faces: dict[str, tuple[str, FaceBox]] = field(default_factory=dict)  # crop key -> (file SHA-256, box)

    def photo_key(self, person: str) -> Callable[[int, str], str]:
        """For `choose_photos`: the key of the person's photo i, whose file has SHA-256 `sha`."""
        boxes = self.boxes[person]

        def key(i: int, sha: str) -> str:
            k = crop_key(sha, boxes[i])
            self.faces[k] = (sha, boxes[i])
            return k
        return key

    def dataset(self, items: list[tuple[Path, str]], preprocess: Callable) -> CroppedDataset:
        return CroppedDataset(items, preprocess, {k: self.faces[k] for _, k in items})

    def write_csv(self, path: Path, rows: list[tuple[str, Path, str]]) -> None:
        """predictions/crops.csv: which file and box each image row (name, path, crop key) is."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["row", "name", "path", "file_sha256", "box"])
            for i, (name, p, key) in enumerate(rows):
                sha, box = self.faces[key]
                w.writerow([i, name, str(p), sha, box.text])


class CroppedDataset(ImageDataset):
    """(path, crop key) items -> DecodedItem of the face cut from the file. The file is read once and must still
    have the SHA-256 it was hashed with (else skipped and retried next run, as `ImageDataset` does)."""

    def __init__(self, items: list[tuple[Path, str]], preprocess: Callable, faces: dict[str, tuple[str, FaceBox]]):
        super().__init__(items, preprocess, keys_are_sha256=False)
        self.faces = faces

    def __getitem__(self, i: int) -> DecodedItem:
        path, key = self.items[i]
        file_sha, box = self.faces[key]
        try:
            data, sha = read_photo(path)
        except OSError as e:
            return DecodedItem(None, key, str(path), f"cannot read: {e.strerror or e} (after it was hashed; tried "
                               "again on the next run)", True)
        if sha != file_sha:
            return DecodedItem(None, key, str(path), "changed while the run read it (its bytes no longer have the "
                               f"SHA-256 {file_sha[:16]}... they had when hashed); tried again on the next run", True)
        return self._preprocessed(lambda: crop_face(decode_rgb(data), box), key, str(path))
