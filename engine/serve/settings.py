"""What `idia-engine serve` is started with, checked when made (every bad value is one line before anything
loads)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..disk.textfiles import check_whole_number
from ..errors import InputError
from ..model.load import DeviceChoice, Precision

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_PHOTOS = 30  # photos per request: the page's 1..30
MAX_UPLOAD_MB = 50  # a request's whole body
# A photo's pixels (from its header, before decoding): 40 megapixels is past any phone camera, and a
# decoded RGB photo of that size is 120 MB. Beyond it an upload is a decompression bomb, not a face.
MAX_PIXELS = 40_000_000
MAX_TOP_K = 100  # names kept per photo and template (the margin reads them; only auditors see them)


@dataclass(frozen=True)
class ServeSettings:
    index_dir: Path  # an index built by build-index
    reference: Path | None = None  # a report written by `query` with labels: where a score falls
    reference_labels: Path | None = None  # its labels (default: the file its summary.json records)
    host: str = LOOPBACK
    port: int = DEFAULT_PORT
    auditor: bool = False  # responses may name the other names a photo resembles
    keep_dir: Path | None = None  # uploads are written here (and only then anywhere)
    max_photos: int = MAX_PHOTOS
    max_upload_mb: int = MAX_UPLOAD_MB
    max_pixels: int = MAX_PIXELS
    top_k: int = 10
    tau: int = 1  # member iff score >= tau (1..T, checked once the index is open)
    device: DeviceChoice = DeviceChoice.AUTO
    precision: Precision = Precision.FP32
    resident_gib: float = 8.0  # the name indexes stay in memory between requests when they fit this

    def __post_init__(self) -> None:
        check_whole_number("--port", self.port, 0, 65535, "a TCP port")
        check_whole_number("--max-photos", self.max_photos, 1, 1000, "photos are decoded and encoded per request")
        check_whole_number("--max-upload-mb", self.max_upload_mb, 1, 4096, "a request's body is held in memory")
        check_whole_number("--max-pixels", self.max_pixels, 1, 1 << 31, "a decoded photo is held in memory")
        check_whole_number("--top-k", self.top_k, 1, MAX_TOP_K, "names kept per photo and template")
        check_whole_number("--tau", self.tau, 1, None, "")
        if not isinstance(self.resident_gib, (int, float)) or not self.resident_gib >= 0:
            raise InputError(f"--resident-gib must be a number of GiB >= 0, got {self.resident_gib!r}")
        if not self.host or any(c.isspace() for c in self.host):
            raise InputError(f"--host {self.host!r} is not a host name or IP address (e.g. 127.0.0.1)")
        if self.keep_dir is not None and Path(self.keep_dir).exists() and not Path(self.keep_dir).is_dir():
            raise InputError(f"--keep {self.keep_dir} exists and is not a directory")

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def loopback_only(self) -> bool:
        """Whether only this machine can reach the server."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
