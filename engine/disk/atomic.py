"""Atomic file and directory writes: a reader sees the old content or the new, never a mix.

Files are written to a temporary sibling, flushed to disk, then moved into place with `os.replace`
(atomic on POSIX within one filesystem). Directories are built under a temporary sibling name and
swapped in: with Linux's renameat2(RENAME_EXCHANGE) the old and new directory trade places in one step,
so the final path always exists; elsewhere the old one is moved aside first, leaving a moment without it.

A process killed while staging (kill -9) leaves its temporary directory behind. Each staging process
holds a lock on a sibling `<tmp>.lock` file (released by the kernel when it dies), and the next staging of
the same target removes every temporary sibling whose lock nobody holds.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import ArtifactExistsError, InputError
from .locks import exclusive_lock, try_exclusive

TMP_MARK = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories; best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):  # filesystem or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_abandoned(final: Path) -> None:
    """Delete temporary siblings of `final` left by stagings that died (their lock is free) or by old versions."""
    for p in final.parent.glob(f".{final.name}{TMP_MARK}*"):
        if p.suffix == ".lock" or not p.is_dir():
            continue
        fd = try_exclusive(p.with_name(p.name + ".lock"))
        if fd is None:
            continue  # a live staging
        try:
            shutil.rmtree(p, ignore_errors=True)
            p.with_name(p.name + ".lock").unlink(missing_ok=True)
        finally:
            if fd >= 0:
                os.close(fd)
    for p in final.parent.glob(f".{final.name}.old-*"):  # the moved-aside old copy of a two-step swap
        shutil.rmtree(p, ignore_errors=True)


def _real(path: Path) -> Path:
    """`path` made absolute with every symlink above it resolved (the path itself need not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_swappable(final: Path, flag: str) -> None:
    """Refuse an output folder that cannot be swapped in whole without harm: a symbolic link (the swap would
    move the link aside and put a real folder in its place, leaving the folder it points to stale), a mount
    point (it cannot be renamed), or a path with no parent to stage beside (/, ., ..)."""
    final = Path(final)
    if final.is_symlink():
        raise InputError(f"{flag} {final} is a symbolic link; give the folder it points to "
                         f"({os.path.realpath(final)}) or a new one")
    name = Path(os.path.abspath(final)).name
    if not name or final.name in ("", ".", ".."):
        raise InputError(f"{flag} {final} is not a folder that can be replaced (it has no name of its own); "
                         "give a new folder, e.g. ./report")
    if final.is_dir() and os.path.ismount(final):
        raise InputError(f"{flag} {final} is a mount point, which cannot be swapped for a new folder; "
                         "give a folder inside it")


def check_output_placement(out: Path, flag: str, inputs: Sequence[tuple[str, Path | None]],
                           reports: Sequence[Path] = ()) -> None:
    """Refuse an output folder placed where writing or replacing it would harm an input.

    `inputs` are (what, path) pairs (faces folder, index dir, store, labels file, ...): the output may be
    neither one of them, nor inside one (a report inside the faces folder is read as a person on the next
    run), nor hold one (the output folder is replaced whole, and with it whatever is inside). `reports` may
    hold the output (evaluate's default is <report>/evaluation) but be neither it nor inside it.
    """
    check_swappable(out, flag)
    real_out = _real(out)
    for what, path in inputs:
        if path is None:
            continue
        real = _real(path)
        if real == real_out:
            raise InputError(f"{flag} {out} is the {what} {path}; give a separate output folder")
        if real_out.is_relative_to(real):
            raise InputError(f"{flag} {out} is inside the {what} {path}; give an output folder outside it")
        if real.is_relative_to(real_out):
            raise InputError(f"the {what} {path} is inside {flag} {out}, which is replaced whole; "
                             "give an output folder that holds no input")
    for report in reports:
        real = _real(report)
        if real == real_out or real.is_relative_to(real_out):
            raise InputError(f"{flag} {out} would replace the report {report}; choose a folder outside the reports")


@contextmanager
def staged_directory(final: Path, *, replace_existing: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `final`; on success swap it in as `final`.

    If the body raises, the temporary directory is removed and `final` is untouched. With
    `replace_existing`, an existing `final` is replaced (exchanged atomically where the OS can, else moved
    aside first), and the old content deleted: the caller has checked that it holds an earlier output of
    its own. A symbolic link or a mount point as `final` is refused before anything is staged.
    """
    final = Path(final)
    check_swappable(final, "output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    tmp = final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    lock = tmp.with_name(tmp.name + ".lock")
    with exclusive_lock(lock, f"staging directory {tmp}"):
        tmp.mkdir()
        try:
            yield tmp
            if final.exists():
                if not replace_existing:
                    raise FileExistsError(final)
                if not _exchange(tmp, final):
                    trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                    os.replace(final, trash)
                    os.replace(tmp, final)
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(final.parent)
        finally:
            if tmp.exists():  # the body failed, or tmp now holds the exchanged-out old content
                shutil.rmtree(tmp, ignore_errors=True)
            lock.unlink(missing_ok=True)


def check_only_own_files(folder: Path, own: set[str], flag: str, what: str) -> None:
    """Refuse to replace an earlier output folder that holds a file the output never writes (the user's own,
    added since): replacing the folder would delete it. `own` are the files the earlier output lists, as
    POSIX paths relative to the folder; a folder whose every file is listed there may be replaced."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(folder).as_posix()
        if rel not in own:
            raise InputError(f"{flag} {folder} holds {rel}, which no {what} writes; replacing the folder would "
                             "delete it: move it out or choose another output folder")


def check_replaceable_output(out_dir: Path, manifest: str, artifact: str, what: str) -> None:
    """Refuse an output folder that is neither new, nor empty, nor an earlier `what` whose every file it
    lists (its `manifest` JSON names the artifact and lists its files under "files")."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"{what} output {out_dir} exists and is not a directory")
    try:
        earlier = json.loads((out_dir / manifest).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        earlier = None
    if isinstance(earlier, dict) and earlier.get("artifact") == artifact:
        files = earlier.get("files") if isinstance(earlier.get("files"), dict) else {}
        check_only_own_files(out_dir, {manifest, *files}, f"{what} output", what)
        return
    if any(out_dir.iterdir()):
        raise ArtifactExistsError(f"{what} output {out_dir} is not empty and holds no earlier {what}; "
                                  "choose another output folder")
