"""Uploaded photos to pixels, in memory, by the same decoding as `query`'s (first frame, EXIF orientation,
RGB, the shape checks), with the server's pixel limit read from the header before anything is decoded."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..query.images import decode_rgb
from .upload import RequestError, UploadedFile


@dataclass(frozen=True)
class DecodedPhoto:
    position: int  # 0-based place in the upload
    filename: str
    sha256: str
    image: Image.Image  # RGB, upright


@dataclass(frozen=True)
class DuplicateUpload:
    position: int
    filename: str
    same_as: int  # the position of the first upload with these bytes


def decode_uploads(files: list[UploadedFile], max_pixels: int) -> tuple[list[DecodedPhoto], list[DuplicateUpload]]:
    """Every upload decoded, copies of an earlier upload set aside (one photo, one vote, as in `query`).

    Raises RequestError 422 naming the photo (position and file name) that is empty, not an image, past the
    pixel limit or not the shape of a photo: the request is refused as a whole, so that the answer is never
    about fewer photos than the person meant to send without them seeing why."""
    decoded: list[DecodedPhoto] = []
    duplicates: list[DuplicateUpload] = []
    first: dict[str, int] = {}
    for position, upload in enumerate(files):
        label = f"photo {position + 1} ({upload.filename or 'no file name'})"
        if not upload.data:
            raise RequestError(422, f"{label} is empty; choose image files (JPEG, PNG, WebP, ...)")
        sha = hashlib.sha256(upload.data).hexdigest()
        if sha in first:
            duplicates.append(DuplicateUpload(position, upload.filename, first[sha]))
            continue
        first[sha] = position
        _check_pixels(upload.data, label, max_pixels)
        try:
            image = decode_rgb(upload.data)
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds; each is "not a usable image"
            reason = ("no image format Pillow reads" if isinstance(e, UnidentifiedImageError)
                      else str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise RequestError(422, f"{label} is not an image this server can read ({reason}); "
                                    "choose image files (JPEG, PNG, WebP, ...)") from None
        decoded.append(DecodedPhoto(position, upload.filename, sha, image))
    return decoded, duplicates


def _check_pixels(data: bytes, label: str, max_pixels: int) -> None:
    """Refuse a photo whose header gives more than `max_pixels` pixels (a decompression bomb is a few KB
    that decode to gigabytes): Image.open reads the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        width = height = None
    except Exception:  # noqa: BLE001 - not an image: decode_rgb says so with Pillow's reason
        return
    if width is None or width * height > max_pixels:
        size = "more pixels than Pillow's own bomb limit" if width is None else f"{width} x {height} = {width * height:,} pixels"
        raise RequestError(413, f"{label} has {size}; this server decodes at most {max_pixels:,} pixels per "
                                "photo (--max-pixels): send a smaller copy")
