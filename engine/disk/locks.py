"""Advisory file locks (flock) that keep concurrent builds and queries of one index directory apart.

- One writer per index directory: `build-index` holds `<index-dir>/.build.lock` exclusively for the whole
  build; a second build of the same directory stops at once with a one-line error naming the holder.
- Readers pin a data generation: `query` holds `data-<id>/.readers.lock` shared while it runs; a build that
  replaced that generation deletes it only if it can take the lock exclusively, i.e. when nobody reads it.
  Otherwise the old generation stays until a later build finds it unread.

flock locks belong to the open file and vanish when the process dies, kill -9 included: a crashed build or
query never leaves a stale lock behind. Where fcntl is missing (Windows) locking is skipped.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ArtifactError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]


class LockBusyError(ArtifactError):
    """Another process holds the lock (another build-index of the same index directory)."""


@contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold `path` locked exclusively for the body; raise LockBusyError at once if another process holds it."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise LockBusyError(f"{what} is in use by another process ({holder}); wait for it to finish "
                                "or choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def shared_lock(path: Path) -> int | None:
    """Open `path` and lock it shared (waits while a deleter holds it); return the fd, or None if it is gone.

    The caller keeps the fd open as long as it reads what the lock protects, then `os.close`s it. A lock
    file that exists but cannot be opened (a read-only index from an older version) gives None as well.
    """
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        # A deleter may have removed the file while we waited for the lock: then it protects nothing.
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except OSError:
        os.close(fd)
        return None
    return fd


def try_exclusive(path: Path) -> int | None:
    """Lock `path` exclusively without waiting; return the fd (close it to release), or None if it is held.

    A missing lock file (data written before locks existed) counts as unheld: returns -1.
    """
    if fcntl is None:
        return -1
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd
