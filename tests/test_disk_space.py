"""A full disk is one line naming where and how much is free; a memory-mapped output reserves its blocks
first, so a full disk never becomes a SIGBUS halfway through a write."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from idia_engine.engine.disk.space import allocate_npy, as_disk_full, free_bytes
from idia_engine.engine.errors import DiskFullError


def test_allocate_npy_reserves_its_blocks(tmp_path):
    a = allocate_npy(tmp_path / "x.npy", np.float32, (1000, 64))
    a[:] = 1.0
    a.flush()
    st = os.stat(tmp_path / "x.npy")
    assert st.st_blocks * 512 >= 1000 * 64 * 4  # not a sparse file: the space is held
    assert np.load(tmp_path / "x.npy").sum() == 64000


def test_a_full_disk_at_allocation_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFullError, match=r"no space left on the disk holding .*x\.npy \(about 3\.9 MiB needed, "
                                            r"[\d,.]+ MiB free\); free space there") as e:
        allocate_npy(tmp_path / "x.npy", np.float32, (1000, 1024))
    assert "\n" not in str(e.value) and not (tmp_path / "x.npy").exists()


def test_disk_full_failures_of_any_writer_are_recognised(tmp_path, monkeypatch):
    assert as_disk_full(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f")), None)
    assert as_disk_full(RuntimeError("Error: 'ret == (size)' failed: write error: No space left on device"), tmp_path)
    assert as_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    assert as_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert as_disk_full(ValueError("bad"), tmp_path) is None
    # LMDB says "Input/output error": a full disk only where nothing is free
    eio = OSError(errno.EIO, "Input/output error")
    assert as_disk_full(eio, tmp_path) is None
    monkeypatch.setattr("idia_engine.engine.disk.space.free_bytes", lambda p: 0)
    assert "0.0 MiB free" in str(as_disk_full(eio, tmp_path))
    assert free_bytes(tmp_path / "not" / "yet") is not None
