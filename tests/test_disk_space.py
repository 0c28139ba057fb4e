"""A full disk is one line naming where and how much is free; a memory-mapped output reserves its blocks
first, so a full disk never becomes a SIGBUS halfway through a write."""

from __future__ import annotations

import errno
import os
import re

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


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root can mount one; elsewhere the test is skipped): a disk that really fills up."""
    import shutil
    import subprocess

    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("when", ["before the build", "while writing"])
def test_build_index_on_a_full_disk_is_one_line(tiny_disk, when, world, tiny_model_files, tmp_path, monkeypatch):
    """Refused up front when the disk is short of the estimate; and where the estimate is beaten (the check
    switched off here), the writer's own failure is the same one line, never a traceback or a SIGBUS."""
    from idia_engine.cli.app import app
    from typer.testing import CliRunner

    if when == "while writing":
        monkeypatch.setattr("idia_engine.engine.disk.space.MIN_FREE_BYTES", 0)
        monkeypatch.setattr("idia_engine.engine.index.build.require_free_space", lambda *a, **k: None)

    names = tmp_path / "names.txt"
    names.write_text("\n".join(world["names"] * 1) + "\n", encoding="utf-8")
    config, ckpt = tiny_model_files
    r = CliRunner().invoke(app, ["build-index", str(names), "--index-dir", str(tiny_disk / "idx"), "--model",
                                 str(config), "--pretrained", str(ckpt), "-q"])
    assert r.exit_code == 1, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    pattern = (r"not enough space for the index on the disk holding .*tiny-disk.*: about .* MiB needed, .* MiB free"
               if when == "before the build" else r"no space left on the disk holding .*tiny-disk.* MiB free\)")
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("where", ["store", "out"])
def test_query_on_a_full_disk_is_one_line(tiny_disk, where, world, tiny_model_files, tmp_path):
    from idia_engine.cli.app import app
    from typer.testing import CliRunner

    config, ckpt = tiny_model_files
    runner = CliRunner()
    r = runner.invoke(app, ["build-index", str(world["names_file"]), "--index-dir", str(tmp_path / "idx"), "--model",
                            str(config), "--pretrained", str(ckpt), "--templates", str(_two_templates(tmp_path)), "-q"])
    assert r.exit_code == 0, r.output
    filler = tiny_disk / "filler"  # leave the disk a few KiB: the store's map or the report cannot fit
    filler.write_bytes(b"x" * (60 * 1024))
    store = tiny_disk / "store" if where == "store" else tmp_path / "store"
    out = tiny_disk / "report" if where == "out" else tmp_path / "report"
    r = runner.invoke(app, ["query", str(world["faces"]), "--index-dir", str(tmp_path / "idx"), "--store", str(store),
                            "--out", str(out), "-q"])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert re.search(r"(no space left|not enough space for .*) on the disk holding", lines[0]), lines[0]


def _two_templates(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of {0}.\n{0}\n", encoding="utf-8")
    return path
