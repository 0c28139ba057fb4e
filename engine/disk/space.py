"""A full disk, said in one line: where, how much was needed, how much is free.

Three ways a full disk used to surface: an OSError deep inside a writer (faiss, LMDB, numpy), an LMDB
"Input/output error", or a SIGBUS with no message at all when a memory-mapped file's pages could not be
backed. The data itself stays whole (every artifact is staged and swapped in), so only the telling was
wrong. Here:

- `allocate_npy` creates a memory-mapped .npy and reserves its blocks first (posix_fallocate), so a full
  disk is an ENOSPC at creation, never a SIGBUS in the middle of a write;
- `DiskFullError` is the one-line error; `as_disk_full` recognises a disk-full failure of any writer
  (ENOSPC/EDQUOT, and an I/O error or a writer's message where the location has no space left).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import DiskFullError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_MESSAGES = ("no space left on device", "disk quota exceeded", "file too large")
_NEARLY_FULL_BYTES = 1 << 20  # an I/O error where less than this is free is taken for a full disk


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding path (or its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def disk_full_message(location: Path, needed: int | None = None) -> str:
    free = free_bytes(location)
    need = f"about {_mib(needed)} needed, " if needed else ""
    have = f"{_mib(free)} free" if free is not None else "free space unknown"
    return (f"no space left on the disk holding {location} ({need}{have}); free space there or write to "
            "another disk (--out, --index-dir, --store or --workdir)")


def as_disk_full(exc: BaseException, location: Path | None) -> DiskFullError | None:
    """The one-line DiskFullError an exception stands for, or None if it is not a full disk."""
    if isinstance(exc, DiskFullError):
        return exc
    where = Path(getattr(exc, "filename", None) or location or ".")
    code = getattr(exc, "errno", None)
    text = str(exc).lower()
    if code in _FULL_ERRNOS or any(m in text for m in _FULL_MESSAGES):
        return DiskFullError(disk_full_message(where))
    if code == errno.EIO or "input/output error" in text:  # LMDB reports a full disk as an I/O error
        free = free_bytes(where)
        if free is not None and free < _NEARLY_FULL_BYTES:
            return DiskFullError(disk_full_message(where))
    return None


def allocate_npy(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file opened as a writable memory map, its blocks reserved before any page is touched.

    Without the reservation a sparse file on a full disk fails only when a page is written back: a SIGBUS
    that kills the process without a word. With it, the shortfall is a DiskFullError here.
    """
    path = Path(path)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    size = path.stat().st_size
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            if hasattr(os, "posix_fallocate") and size:
                os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as e:
        del array
        path.unlink(missing_ok=True)
        if e.errno in _FULL_ERRNOS:
            raise DiskFullError(disk_full_message(path, size)) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: go on unreserved
            raise
        return np.lib.format.open_memmap(path, mode="r+")
    return array


MIN_FREE_BYTES = 16 << 20  # an output whose disk has less than this free is refused before any work


def require_free_space(location: Path, needed: int = 0, what: str = "the output") -> None:
    """DiskFullError unless the disk holding `location` has `needed` bytes (and at least MIN_FREE_BYTES) free.

    Checked before work starts: LMDB maps its lock file and numpy its arrays, and on a disk with no room
    for their pages a write is a SIGBUS, which no handler can turn into a message."""
    free = free_bytes(location)
    if free is None:
        return
    want = max(int(needed), MIN_FREE_BYTES)
    if free < want:
        raise DiskFullError(f"not enough space for {what} on the disk holding {location}: about {_mib(want)} needed, "
                            f"{_mib(free)} free; free space there or write to another disk (--out, --index-dir, "
                            "--store or --workdir)")
