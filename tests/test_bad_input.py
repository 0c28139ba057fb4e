"""Every bad input, end to end through the real typer app, as one table.

Each row writes one bad input into its own folder and runs `idia-engine`. An error row must end with
the row's exit code (2 = bad input or usage, 1 = runtime failure), exactly one line on stderr naming
the file / line / value, no traceback, and nothing written: every file under the row's folder is byte
for byte what it was, and no temporary sibling (`.name.tmp-*`) is left. A warning row must succeed and
print the warning. A skipped-file row must succeed, list the file with its reason in summary.json and
still decide the person from the other photos; a conversion row must use the photo.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import shutil
import struct
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import idia_engine.engine.query.images as images_mod
import idia_engine.engine.query.store as store_mod
import numpy as np
import pytest
from idia_engine.cli.app import app
from idia_engine.engine.demo.tiny_model import write_tiny_model
from PIL import Image
from typer.testing import CliRunner

runner = CliRunner()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def model_args(model_files) -> list[str]:
    config, ckpt = model_files
    return ["--model", str(config), "--pretrained", str(ckpt)]


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (LMDB's lock file by presence only), 'dir' for folders."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            out[rel] = "link"
        elif p.is_dir():
            out[rel] = "dir"
        elif p.name == "lock.mdb" or not os.access(p, os.R_OK):
            out[rel] = "present"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def encode_counts(report: Path) -> tuple[int, int]:
    """(images encoded, images from the store) of a report: in summary.json's counts, or in run.json."""
    counts = json.loads((report / "summary.json").read_text(encoding="utf-8"))["counts"]
    if "images_encoded" not in counts:
        counts = json.loads((report / "run.json").read_text(encoding="utf-8"))
    return counts["images_encoded"], counts["images_from_cache"]


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


# --- the world every row starts from -------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory, world, tiny_model_files):
    """An index of the world's 40 names built once (rows copy it), and the people's photos."""
    root = tmp_path_factory.mktemp("bad-input-index")
    r = invoke("build-index", world["names_file"], "--index-dir", root / "idx", *model_args(tiny_model_files), "-q")
    assert r.exit_code == 0, r.output
    return {"idx": root / "idx", "world": world, "model": tiny_model_files}


@dataclass
class Ctx:
    """One row's folder, with helpers that write its inputs."""

    tmp: Path
    built: dict
    expect: list[str] = field(default_factory=list)  # strings the message must contain (paths, lines, values)
    person: str | None = None  # the person of a skipped-file / conversion row
    good: int = 0  # that person's usable photos
    bad_file: Path | None = None  # the file that must be skipped (or used)

    @property
    def world(self) -> dict:
        return self.built["world"]

    @property
    def idx(self) -> Path:
        """A private copy of the built index (made on first use)."""
        idx = self.tmp / "idx"
        if not idx.exists():
            shutil.copytree(self.built["idx"], idx)
        return idx

    def write(self, name: str, data: bytes | str) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return p

    def build(self, names_file: Path, *extra) -> list:
        return ["build-index", names_file, "--index-dir", self.tmp / "new-idx", *model_args(self.built["model"]),
                "-q", *extra]

    def query(self, faces: Path | None = None, *extra, idx: Path | None = None) -> list:
        source = [faces] if faces is not None else []
        return ["query", *source, "--index-dir", idx or self.idx, "--out", self.tmp / "report", "-q", *extra]

    def faces(self, people: int = 2, photos: int = 3) -> Path:
        """faces/ with `people` of the world's people, `photos` each (copied)."""
        faces = self.tmp / "faces"
        for name in self.world["people"][:people]:
            src = self.world["faces"] / name.replace(" ", "_")
            dst = faces / src.name
            dst.mkdir(parents=True, exist_ok=True)
            for p in sorted(src.glob("*.png"))[:photos]:
                shutil.copy(p, dst / p.name)
        return faces

    def faces_with(self, filename: str, make: Callable[[Path], None], photos: int = 3) -> Path:
        """faces/ where the first person also has `filename`, made by `make(path)`."""
        faces = self.faces(photos=photos)
        self.person = self.world["people"][0]
        self.good = photos
        self.bad_file = faces / self.person.replace(" ", "_") / filename
        make(self.bad_file)
        return faces


# --- image makers ----------------------------------------------------------------------------------------


def _rgb(size: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def truncated_jpeg(path: Path) -> None:
    Image.fromarray(_rgb(64)).save(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def png_bomb(path: Path, side: int = 20000) -> None:
    """A PNG whose header claims side x side pixels (20000: over twice Pillow's limit): refused before decoding."""
    Image.new("RGB", (1, 1)).save(path, format="PNG")
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))


def cmyk_jpeg(path: Path) -> None:
    Image.fromarray(_rgb()).convert("CMYK").save(path, format="JPEG", quality=95)


def png16(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 65535, size=(40, 40), dtype=np.uint16)).save(path)


def palette_png(path: Path) -> None:
    Image.fromarray(_rgb()).convert("P").save(path, transparency=0)


def rgba_png(path: Path) -> None:
    rgba = np.concatenate([_rgb(), np.full((40, 40, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(path)


def symlink_loop(path: Path) -> None:
    os.symlink(path.name, path)  # points at itself


def dangling_symlink(path: Path) -> None:
    os.symlink(path.parent / "gone.png", path)


def unreadable(path: Path) -> None:
    if IS_ROOT:
        pytest.skip("root reads a chmod 000 file; the dangling-symlink and directory rows cover this path")
    Image.fromarray(_rgb()).save(path)
    path.chmod(0)


# --- setups: each writes the bad input and returns the command line ------------------------------------


def names_file(ctx: Ctx, data: bytes | str, line: int | None = None) -> list:
    f = ctx.write("names.txt", data)
    ctx.expect += [f"{f}:{line}" if line else str(f)]
    return ctx.build(f)


def names_missing(ctx):
    ctx.expect.append(str(ctx.tmp / "names.txt"))
    return ctx.build(ctx.tmp / "names.txt")


def names_directory(ctx):
    (ctx.tmp / "names.txt").mkdir()
    ctx.expect.append(str(ctx.tmp / "names.txt"))
    return ctx.build(ctx.tmp / "names.txt")


def names_unreadable(ctx):
    if IS_ROOT:
        pytest.skip("root reads a chmod 000 file")
    args = names_file(ctx, "Anna Smith\n")
    (ctx.tmp / "names.txt").chmod(0)
    return args


def names_too_long(ctx):
    # The tiny model's context is 32 tokens: 30 words cut every prompt, and the two names differ only after.
    long = " ".join(["Anna"] * 30)
    f = ctx.write("names.txt", "\n".join(ctx.world["names"][:5] + [long + " Smith", long + " Jones"]) + "\n")
    return ctx.build(f)


def names_differ_only_in_case(ctx):
    f = ctx.write("names.txt", "\n".join(ctx.world["names"][:5] + ["anna smith", "Anna Smith"]) + "\n")
    return ctx.build(f)


def templates_file(ctx: Ctx, text: str, line: int | None = None) -> list:
    f = ctx.write("templates.txt", text)
    ctx.expect.append(f"{f}:{line}" if line else str(f))
    return ctx.build(ctx.world["names_file"], "--templates", f)


def faces_missing(ctx):
    ctx.expect.append(str(ctx.tmp / "faces"))
    return ctx.query(ctx.tmp / "faces")


def faces_empty(ctx):
    (ctx.tmp / "faces").mkdir()
    ctx.expect.append(str(ctx.tmp / "faces"))
    return ctx.query(ctx.tmp / "faces")


def faces_is_a_file(ctx):
    f = ctx.write("faces", "not a folder")
    ctx.expect.append(str(f))
    return ctx.query(f)


def person_without_images(ctx):
    faces = ctx.faces()
    (faces / "Nobody_Here").mkdir()
    return ctx.query(faces)


def folders_differ_in_case(ctx):
    faces = ctx.faces(people=1)
    folder = next(faces.iterdir())
    other = faces / folder.name.lower()
    other.mkdir()
    shutil.copy(next(folder.glob("*.png")), other / "x.png")
    ctx.expect += [str(folder), str(other)]
    return ctx.query(faces)


def folders_differ_in_unicode_form(ctx):
    faces = ctx.faces(people=1)
    photo = next(next(faces.iterdir()).glob("*.png"))
    for form in ("NFC", "NFD"):
        d = faces / unicodedata.normalize(form, "Zoë_Kravitz")
        d.mkdir()
        shutil.copy(photo, d / "x.png")
    ctx.expect += [str(faces / unicodedata.normalize("NFC", "Zoë_Kravitz")),
                   str(faces / unicodedata.normalize("NFD", "Zoë_Kravitz"))]
    return ctx.query(faces)


def manifest_csv(ctx: Ctx, rows: list[tuple[str, str]]) -> Path:
    return ctx.write("images.csv", "path,name\n" + "".join(f"{p},{n}\n" for p, n in rows))


def csv_names_differ_in_case(ctx):
    faces = ctx.faces(people=1)
    photos = sorted(next(faces.iterdir()).glob("*.png"))
    person = ctx.world["people"][0]
    f = manifest_csv(ctx, [(p.relative_to(ctx.tmp), n) for p, n in zip(photos, [person, person.upper(), person])])
    ctx.expect += [f"{f}:3", repr(person.upper()), repr(person)]
    return ctx.query(None, "--manifest", f)


def csv_directory_named_like_an_image(ctx):
    faces = ctx.faces(people=1)
    ctx.person, ctx.good = ctx.world["people"][0], 3
    photos = sorted(next(faces.iterdir()).glob("*.png"))
    ctx.bad_file = faces / "folder.jpg"
    ctx.bad_file.mkdir()
    f = manifest_csv(ctx, [(p.relative_to(ctx.tmp), ctx.person) for p in photos + [ctx.bad_file]])
    return ctx.query(None, "--manifest", f)


def index_missing(ctx):
    ctx.expect.append(str(ctx.tmp / "nope"))
    return ctx.query(ctx.faces(), idx=ctx.tmp / "nope")


def index_not_an_index(ctx):
    (ctx.tmp / "idx").mkdir()
    ctx.write("idx/readme.txt", "hello")
    ctx.expect.append(str(ctx.tmp / "idx"))
    return ctx.query(ctx.faces())


def edit_manifest(ctx: Ctx, change: Callable[[dict], None]) -> list:
    path = ctx.idx / "manifest.json"
    obj = json.loads(path.read_text(encoding="utf-8"))
    change(obj)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    ctx.expect.append(str(path))
    return ctx.query(ctx.faces())


def index_manifest_invalid_json(ctx):
    path = ctx.idx / "manifest.json"
    path.write_text(path.read_text(encoding="utf-8")[:100], encoding="utf-8")  # cut short, as by hand
    ctx.expect.append(str(path))
    return ctx.query(ctx.faces())


def template_file_of(ctx: Ctx, t: int = 0) -> Path:
    manifest = json.loads((ctx.idx / "manifest.json").read_text(encoding="utf-8"))
    return ctx.idx / manifest["data_dir"] / next(n for n in manifest["files"] if n.startswith(f"template_{t:02d}."))


def index_file_truncated(ctx):
    p = template_file_of(ctx)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    ctx.expect.append(str(p))
    return ctx.query(ctx.faces())


def index_file_corrupt(ctx):
    p = template_file_of(ctx)
    p.write_bytes(np.random.default_rng(0).integers(0, 256, p.stat().st_size, dtype=np.uint8).tobytes())
    ctx.expect.append(str(p))
    return ctx.query(ctx.faces())


def index_of_a_changed_model(ctx):
    """The checkpoint the index was built with is replaced by other weights (another model)."""
    config, ckpt = write_tiny_model(ctx.tmp / "model", seed=0)
    r = invoke("build-index", ctx.world["names_file"], "--index-dir", ctx.tmp / "idx2", "--model", config,
               "--pretrained", ckpt, "-q")
    assert r.exit_code == 0, r.output
    write_tiny_model(ctx.tmp / "other", seed=1)
    shutil.copy(ctx.tmp / "other" / "tiny-clip.pt", ckpt)
    ctx.expect.append(str(ctx.tmp / "idx2"))
    return ctx.query(ctx.faces(), idx=ctx.tmp / "idx2")


def build_over_another_template_set(ctx):
    f = ctx.write("templates.txt", "a photo of {0}\n")
    shutil.copytree(ctx.built["idx"], ctx.tmp / "new-idx")
    ctx.expect.append(str(ctx.tmp / "new-idx"))
    return ctx.build(ctx.world["names_file"], "--templates", f)


def store_of_another_model(ctx):
    """A store already holding embeddings of another model: its keys say so, nothing is mixed."""
    config, ckpt = write_tiny_model(ctx.tmp / "other", seed=1)
    faces = ctx.faces()
    r = invoke("build-index", ctx.world["names_file"], "--index-dir", ctx.tmp / "idx-other", "--model", config,
               "--pretrained", ckpt, "-q")
    assert r.exit_code == 0, r.output
    r = invoke("query", faces, "--index-dir", ctx.tmp / "idx-other", "--out", ctx.tmp / "report-other",
               "--store", ctx.tmp / "store", "-q")
    assert r.exit_code == 0, r.output
    return ctx.query(faces, "--store", ctx.tmp / "store")


def store_dtype_mismatch(ctx):
    faces = ctx.faces()
    r = invoke(*ctx.query(faces, "--store", ctx.tmp / "store"))
    assert r.exit_code == 0, r.output
    shutil.rmtree(ctx.tmp / "report")
    ctx.expect += [str(ctx.tmp / "store"), "float32", "float16"]
    return ctx.query(faces, "--store", ctx.tmp / "store", "--store-dtype", "float16")


def store_map_full(ctx, monkeypatch):
    monkeypatch.setattr(store_mod, "_INITIAL_MAP_SIZE", 16 << 10)  # 4 pages: full after a few embeddings
    return ctx.query(ctx.faces(people=5, photos=4), "--store", ctx.tmp / "store", "--batch-size", "4")


def store_read_only(ctx):
    if IS_ROOT:
        pytest.skip("root writes into a read-only folder")
    (ctx.tmp / "ro").mkdir()
    (ctx.tmp / "ro").chmod(0o555)
    ctx.expect.append(str(ctx.tmp / "ro" / "store"))
    return ctx.query(ctx.faces(), "--store", ctx.tmp / "ro" / "store")


def _store_on_a_read_only_filesystem(ctx, monkeypatch, extra_people: int) -> list:
    """A store filled by an earlier query, then on a filesystem that refuses writes (as root can't chmod)."""
    store = ctx.tmp / "store"
    assert invoke(*ctx.query(ctx.faces(people=2), "--store", store, "--out", ctx.tmp / "first")).exit_code == 0
    real_open = store_mod.lmdb.open

    def refuse_writes(path, **kw):
        if not kw.get("readonly"):
            raise store_mod.lmdb.Error(f"{path}: {os.strerror(errno.EROFS)}")
        return real_open(path, **kw)
    monkeypatch.setattr(store_mod.lmdb, "open", refuse_writes)
    ctx.expect.append(str(store))
    return ctx.query(ctx.faces(people=2 + extra_people), "--store", store)


def store_read_only_with_images_to_encode(ctx, monkeypatch):
    return _store_on_a_read_only_filesystem(ctx, monkeypatch, extra_people=1)


def store_read_only_with_everything_cached(ctx, monkeypatch):
    return _store_on_a_read_only_filesystem(ctx, monkeypatch, extra_people=0)


def store_is_a_file(ctx):
    f = ctx.write("store", "not a store")
    ctx.expect.append(str(f))
    return ctx.query(ctx.faces(), "--store", f)


def labels(ctx: Ctx, text: str, line: int | None = None) -> list:
    f = ctx.write("labels.csv", text)
    ctx.expect.append(f"{f}:{line}" if line else str(f))
    return ctx.query(ctx.faces(), "--labels", f)


def out_dir_holds_something_else(ctx):
    ctx.write("report/notes.txt", "mine")
    ctx.expect.append(str(ctx.tmp / "report"))
    return ctx.query(ctx.faces())


def photo_copied_under_another_name(ctx):
    """The same bytes twice in one person's folder: one photo, one vote (the copy is dropped, with a warning)."""
    faces = ctx.faces()
    folder = faces / ctx.world["people"][0].replace(" ", "_")
    shutil.copy(sorted(folder.glob("*.png"))[0], folder / "zz-copy.png")
    return ctx.query(faces)


def exif_sideways_jpeg(path: Path) -> None:
    """A phone's photo: the pixels stored sideways, the EXIF orientation tag (6) saying how to turn them."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_rgb(40)[:, :30]).transpose(Image.Transpose.ROTATE_90).save(path, format="JPEG", exif=exif)


def photo_too_large(ctx, monkeypatch):
    """A file over the size a photo may have is not read at all (a video among the photos)."""
    faces = ctx.faces()
    limit = max(p.stat().st_size for p in faces.rglob("*.png"))  # every real photo fits; the big one does not
    monkeypatch.setattr(images_mod, "MAX_PHOTO_BYTES", limit)
    return ctx.query(ctx.faces_with("huge.mov", lambda p: p.write_bytes(bytes(limit + 1))))


def _racing_read(ctx, monkeypatch, meanwhile: Callable[[Path], None]) -> None:
    """The file of this row changes after it was hashed, just before its one read for decoding."""
    real_read = images_mod.read_photo

    def read(path):
        if Path(path) == ctx.bad_file:
            meanwhile(Path(path))
        return real_read(path)
    monkeypatch.setattr(images_mod, "read_photo", read)


def photo_unreadable_after_hashing(ctx, monkeypatch):
    """Listed and hashed, then gone (or locked) when decoded: skipped now, not remembered, retried next run."""
    faces = ctx.faces_with("vanishing.png", lambda p: Image.fromarray(_rgb(seed=3)).save(p))
    _racing_read(ctx, monkeypatch, lambda p: p.unlink())
    return ctx.query(faces)


def photo_replaced_after_hashing(ctx, monkeypatch):
    """Another photo takes its name between the hash and the decode: never stored under the old hash."""
    faces = ctx.faces_with("replaced.png", lambda p: Image.fromarray(_rgb(seed=4)).save(p))
    _racing_read(ctx, monkeypatch, lambda p: Image.fromarray(_rgb(seed=5)).save(p, format="PNG"))
    return ctx.query(faces)


# --- hostile inputs: options out of their domain, manifests that say nothing, outputs in odd places ----


def out_inside(ctx: Ctx, where: str) -> list:
    """--out inside (or equal to) one of the query's inputs."""
    faces = ctx.faces()
    out = {"faces": faces / "report", "index": ctx.idx, "index-sub": ctx.idx / "report",
           "store": ctx.idx / "image-store" / "report"}[where]
    ctx.expect.append(str(out))
    return ["query", faces, "--index-dir", ctx.idx, "--out", out, "-q"]


def store_inside_out(ctx):
    """The report folder is replaced whole: a store inside it would be deleted with the old report."""
    ctx.expect += [str(ctx.tmp / "report" / "store"), str(ctx.tmp / "report")]
    return ctx.query(ctx.faces(), "--store", ctx.tmp / "report" / "store")


def index_inside_faces(ctx):
    faces = ctx.faces()
    shutil.copytree(ctx.idx, faces / "idx")
    ctx.expect.append(str(faces / "idx"))
    return ctx.query(faces, idx=faces / "idx")


def out_is_a_symlink(ctx):
    """A symlink as --out: the swap would replace the link, not the folder it points to."""
    first = invoke(*ctx.query(ctx.faces()))
    assert first.exit_code == 0, first.output
    (ctx.tmp / "link").symlink_to(ctx.tmp / "report")
    ctx.expect.append(str(ctx.tmp / "link"))
    return ctx.query(ctx.faces(), "--out", ctx.tmp / "link")


def bracketed_faces_missing(ctx):
    """A path that reads as rich markup is printed as written in the error line."""
    ctx.expect.append(str(ctx.tmp / "[bold]faces[/x]"))
    return ctx.query(ctx.tmp / "[bold]faces[/x]")


def wide_png(path: Path) -> None:
    """A few hundred bytes of PNG, 400,000 x 1 pixels: under Pillow's pixel limit, absurd to preprocess."""
    Image.new("L", (400_000, 1)).save(path, format="PNG")


def names_with_the_same_tokens(ctx):
    """Different strings the tokenizer reads alike (whitespace, HTML, case, a no-break space), and a second file
    appended with its byte-order mark: the later spellings are dropped, the BOM line is a plain duplicate."""
    names = ctx.world["names"][:5] + ["Anna Smith", "Anna  Smith", "Tom & Jerry", "Tom &amp; Jerry", "ANNA SMITH",
                                      ctx.world["names"][4].replace(" ", "\u00a0")]
    text = "\n".join(names) + "\n" + "\ufeff" + ctx.world["names"][3] + "\n"
    return ctx.build(ctx.write("names.txt", text))


def _person_folder(ctx, faces: Path, folder: str, person: int = 0) -> Path:
    """faces/<folder> holding the photos of the world's person `person`."""
    shutil.copytree(ctx.world["faces"] / ctx.world["people"][person].replace(" ", "_"), faces / folder)
    return faces / folder


def folder_with_the_tokens_of_an_index_name(ctx):
    """`First__Last`: the name 'First  Last', not in the index as written, but the same tokens as 'First Last'."""
    faces = ctx.faces(people=2)
    person = ctx.world["people"][0]
    shutil.move(faces / person.replace(" ", "_"), faces / person.replace(" ", "__"))
    return ctx.query(faces)


def csv_name_with_the_tokens_of_an_index_name(ctx):
    faces = ctx.faces(people=1)
    photos = sorted(next(faces.iterdir()).glob("*.png"))
    name = "  " + ctx.world["people"][0].split()[0].lower() + "   " + ctx.world["people"][0].split()[1].upper() + " "
    return ctx.query(None, "--manifest", manifest_csv(ctx, [(p.relative_to(ctx.tmp), name) for p in photos]))


def folders_with_the_same_tokens(ctx):
    faces = ctx.faces(people=1)
    person = ctx.world["people"][0]
    _person_folder(ctx, faces, person.replace(" ", "__"))
    ctx.expect += [str(faces), repr(person), repr(person.replace(" ", "  "))]
    return ctx.query(faces)


LONG_NAME = "_".join(["Anna"] * 30)  # cut by the tiny model's 32-token context under every template


def added_names_longer_than_context(ctx):
    faces = ctx.faces(people=1)
    _person_folder(ctx, faces, LONG_NAME + "_Smith")
    _person_folder(ctx, faces, LONG_NAME + "_Jones", person=1)
    return ctx.query(faces)


# --- the table --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    setup: Callable  # (ctx) or (ctx, monkeypatch) -> argv
    exit: int  # expected exit code
    pattern: str  # regex the error line (or, for exit 0, the output) must match
    kind: str = "error"  # error | warning | skipped | converted | ok
    marks: tuple = ()
    may_write: str | None = None  # a folder an error row may still have written whole (committed) files into


P = pytest.param

ROWS = [
    # names.txt
    Row("names-missing", names_missing, 2, r"names file .* does not exist"),
    Row("names-directory", names_directory, 2, r"is not a regular file"),
    Row("names-empty", lambda c: names_file(c, ""), 2, r"holds no name"),
    Row("names-only-comments", lambda c: names_file(c, "# a\n\n  # b\n"), 2, r"holds no name"),
    Row("names-not-utf8", lambda c: names_file(c, "Anna\nBob\nJos\xe9\n".encode("latin-1"), 3), 2,
        r"not valid UTF-8 \(byte 0xe9 .*save the names file as UTF-8"),
    Row("names-nul-byte", lambda c: names_file(c, b"Anna\nBo\x00b\n", 2), 2, r"U\+0000.*no tabs or control"),
    Row("names-control-char", lambda c: names_file(c, "Anna\n# c\nBo\x1bb\n", 3), 2, r"'Bo\\x1bb'.*U\+001B"),
    Row("names-tab-inside", lambda c: names_file(c, "Anna\tSmith\n", 1), 2, r"U\+0009"),
    Row("names-unreadable", names_unreadable, 2, r"cannot be read"),
    Row("names-duplicates", lambda c: names_file(c, "Anna Smith\nBob Jones\nAnna Smith\n"), 0,
        r"warning: .*dropped 1 duplicate name\(s\).*'Anna Smith'", "warning"),
    Row("names-longer-than-context", names_too_long, 0,
        r"(?s)warning: .*would be truncated.*\nwarning: .*identical truncated prompts", "warning"),
    Row("names-differ-only-in-case", names_differ_only_in_case, 0,
        r"warning: .*dropped 1 name\(s\) that the model's tokenizer reads as the same tokens as an earlier name, "
        r"first kept \(e\.g\. 'Anna Smith' = 'anna smith'\)", "warning"),
    Row("names-same-tokens", names_with_the_same_tokens, 0,
        r"(?s)dropped 1 duplicate name\(s\).*dropped 4 name\(s\) that the model's tokenizer reads as the same "
        r"tokens as an earlier name, first kept \(e\.g\. 'Anna  Smith' = 'Anna Smith'\)", "warning"),
    # templates file
    Row("templates-no-placeholder", lambda c: templates_file(c, "# t\na photo\n", 2), 2, r"'a photo' has no placeholder"),
    Row("templates-two-placeholders", lambda c: templates_file(c, "{0} and {}\n", 1), 2, r"has 2 placeholders"),
    Row("templates-empty", lambda c: templates_file(c, ""), 2, r"holds no template"),
    Row("templates-missing", lambda c: c.build(c.world["names_file"], "--templates", c.tmp / "t.txt"), 2,
        r"templates file .*t\.txt does not exist"),
    # faces/
    Row("faces-missing", faces_missing, 2, r"faces folder .* does not exist"),
    Row("faces-empty", faces_empty, 2, r"holds no person folder"),
    Row("faces-is-a-file", faces_is_a_file, 2, r"is not a directory"),
    Row("faces-person-without-images", person_without_images, 0, r"1 person\(s\) had no usable image", "ok"),
    Row("faces-non-image-file", lambda c: c.query(c.faces_with("notes.txt", lambda p: p.write_text("hi"))), 0,
        r"not a decodable image", "skipped"),
    Row("faces-zero-byte", lambda c: c.query(c.faces_with("empty.jpg", lambda p: p.write_bytes(b""))), 0,
        r"empty file \(0 bytes\)", "skipped"),
    Row("faces-truncated-jpeg", lambda c: c.query(c.faces_with("cut.jpg", truncated_jpeg)), 0,
        r"not a decodable image \(OSError: .*truncated", "skipped"),
    Row("faces-decompression-bomb", lambda c: c.query(c.faces_with("bomb.png", png_bomb)), 0,
        r"decompression bomb refused", "skipped"),
    # 10000 x 10000 lies between Pillow's limit and twice it, where Pillow itself only warns.
    Row("faces-decompression-bomb-moderate",
        lambda c: c.query(c.faces_with("bomb.png", lambda p: png_bomb(p, 10000))), 0,
        r"decompression bomb refused", "skipped"),
    Row("faces-symlink-loop", lambda c: c.query(c.faces_with("loop.jpg", symlink_loop)), 0,
        r"cannot read: Too many levels of symbolic links", "skipped"),
    Row("faces-dangling-symlink", lambda c: c.query(c.faces_with("gone.jpg", dangling_symlink)), 0,
        r"cannot read: No such file", "skipped"),
    Row("faces-unreadable-file", lambda c: c.query(c.faces_with("locked.png", unreadable)), 0,
        r"cannot read: Permission denied", "skipped"),
    Row("faces-directory-named-like-an-image", csv_directory_named_like_an_image, 0, r"cannot read: Is a directory",
        "skipped"),
    Row("faces-cmyk-jpeg", lambda c: c.query(c.faces_with("cmyk.jpg", cmyk_jpeg)), 0, "", "converted"),
    Row("faces-16-bit-png", lambda c: c.query(c.faces_with("grey16.png", png16)), 0, "", "converted"),
    Row("faces-palette-png", lambda c: c.query(c.faces_with("palette.png", palette_png)), 0, "", "converted"),
    Row("faces-rgba-png", lambda c: c.query(c.faces_with("alpha.png", rgba_png)), 0, "", "converted"),
    Row("faces-folders-differ-in-case", folders_differ_in_case, 2, r"differ only in letter case; merge or rename"),
    Row("faces-folders-differ-in-unicode-form", folders_differ_in_unicode_form, 2, r"both name 'Zoë Kravitz'"),
    Row("faces-csv-names-differ-in-case", csv_names_differ_in_case, 2, r"differs only in letter case .*\(line 2\)"),
    # identity is what the model sees: the name's token ids, not its string
    Row("faces-folder-same-tokens-as-index-name", folder_with_the_tokens_of_an_index_name, 0,
        r"1 person\(s\) have the token ids of an index name .*'Björn  Costa' as 'Björn Costa'", "ok"),
    Row("faces-csv-name-same-tokens-as-index-name", csv_name_with_the_tokens_of_an_index_name, 0,
        r"'björn   COSTA' as 'Björn Costa'", "ok"),
    Row("faces-folders-same-tokens", folders_with_the_same_tokens, 2,
        r"persons 'Björn  Costa' and 'Björn Costa' are the same token ids .*put their photos under one name"),
    Row("faces-added-names-longer-than-context", added_names_longer_than_context, 0,
        r"(?s)names added for this run: 2 name\(s\) make prompts longer than the model's context.*"
        r"names added for this run: 21 group\(s\) of different names get identical truncated prompts", "ok"),
    Row("faces-same-photo-twice", photo_copied_under_another_name, 0,
        r"warning: dropped 1 duplicate photo\(s\).*zz-copy\.png.*duplicate_photos", "warning"),
    Row("faces-exif-sideways-jpeg", lambda c: c.query(c.faces_with("sideways.jpg", exif_sideways_jpeg)), 0, "",
        "converted"),
    Row("faces-larger-than-a-photo", photo_too_large, 0, r"file of \d+ bytes is larger than a photo may be",
        "skipped"),
    Row("faces-unreadable-after-hashing", photo_unreadable_after_hashing, 0,
        r"cannot read: No such file .*tried again on the next run", "skipped"),
    Row("faces-replaced-after-hashing", photo_replaced_after_hashing, 0, r"changed while the run read it .*SHA-256",
        "skipped"),
    # index dir
    Row("index-missing", index_missing, 2, r"index dir .* does not exist; build one"),
    Row("index-not-an-index", index_not_an_index, 1, r"holds no manifest\.json"),
    Row("index-newer-schema", lambda c: edit_manifest(c, lambda m: m.update(schema_version=2)), 1,
        r"has schema version 2; this idia-engine reads version 1"),
    Row("index-file-truncated", index_file_truncated, 1, r"has \d+ bytes, the manifest says \d+; rebuild"),
    # Found only when the search loads the file, after the photos' embeddings were committed to the store
    # (a cache of whole entries): the store may have grown, nothing else.
    Row("index-file-corrupt", index_file_corrupt, 1, r"cannot be read .*rebuild the index",
        may_write="idx/image-store"),
    Row("index-manifest-invalid-json", index_manifest_invalid_json, 1, r"is not valid JSON"),
    Row("index-manifest-num-names-edited", lambda c: edit_manifest(c, lambda m: m.update(num_names=41)), 1,
        r"holds 40 names, the manifest says 41|was changed after build-index wrote it"),
    Row("index-manifest-edited-consistently",
        lambda c: edit_manifest(c, lambda m: m["templates"].__setitem__(2, "a drawing of {0}")), 1,
        r"was changed after build-index wrote it .*restore it or rebuild"),
    Row("index-built-with-another-model", index_of_a_changed_model, 1, r"fingerprint .*rebuild the index"),
    Row("index-build-over-another-template-set", build_over_another_template_set, 2,
        r"already holds an index.*; pass --overwrite to replace it"),
    # store
    Row("store-of-another-model", store_of_another_model, 0, "", "ok"),
    Row("store-dtype-mismatch", store_dtype_mismatch, 1, r"as float32\[64\], asked for float16\[64\]"),
    Row("store-map-full", store_map_full, 0, "", "ok"),
    Row("store-read-only-location", store_read_only, 1, r"embedding store .*(Permission denied|read-only).*writable"),
    Row("store-read-only-images-to-encode", store_read_only_with_images_to_encode, 1,
        r"embedding store .* is read-only \(.*\); 3 images need encoding .*--store with a writable directory"),
    Row("store-read-only-all-cached", store_read_only_with_everything_cached, 0, "", "ok"),
    Row("store-is-a-file", store_is_a_file, 1, r"exists and is not a directory"),
    # labels CSV
    Row("labels-unknown-names", lambda c: labels(c, "name,member\nSomebody Else,1\n"), 0,
        r"warning: labels name 1 person\(s\) that were not queried \(e\.g\. 'Somebody Else'\)", "warning"),
    Row("labels-bad-value", lambda c: labels(c, "name,member\nAnna,1\nBob,maybe\n", 3), 2,
        r"member value 'maybe' for 'Bob'; use 1/0, true/false or yes/no"),
    Row("labels-bad-occurrences", lambda c: labels(c, "name,member,occurrences\nAnna,1,-3\n", 2), 2,
        r"occurrences value '-3'.*whole number >= 0"),
    Row("labels-missing-column", lambda c: labels(c, "name,label\nAnna,1\n"), 2, r"has no column 'member'"),
    # output
    Row("out-holds-something-else", out_dir_holds_something_else, 2, r"is not empty and is not an idia-engine report"),
    # hostile options: every value outside its domain is refused before any work
    Row("opt-query-seed-negative", lambda c: c.query(c.faces(), "--seed", "-1"), 2, r"--seed must be >= 0, got -1"),
    Row("opt-query-top-k-huge", lambda c: c.query(c.faces(), "--top-k", "1000000000"), 2,
        r"--top-k must be <= 2048 \(.*\), got 1000000000"),
    Row("opt-query-search-param-inf", lambda c: c.query(c.faces(), "--search-param", "nprobe=1.0e999"), 2,
        r"--search-param must look like nprobe=64"),
    Row("opt-build-factory-zero", lambda c: c.build(c.world["names_file"], "--index", "HNSW0,Flat"), 2,
        r"--index 'HNSW0,Flat' .*parameter of 0 .*crashes faiss"),
    Row("opt-build-factory-degree-1", lambda c: c.build(c.world["names_file"], "--index", "IVF4_HNSW1,Flat"), 2,
        r"HNSW1 has graph degree 1"),
    Row("opt-build-factory-huge", lambda c: c.build(c.world["names_file"], "--index", "IVF2000000000,Flat"), 2,
        r"has the parameter 2000000000; at most 1048576"),
    # manifests that say nothing, or the wrong thing
    Row("index-manifest-checksum-removed", lambda c: edit_manifest(c, lambda m: m.pop("manifest_sha256")), 1,
        r"lacks the key 'manifest_sha256'"),
    Row("index-manifest-string-for-int", lambda c: edit_manifest(c, lambda m: m.update(num_names="40")), 1,
        r"key 'num_names' must be a whole number >= 0, not a string \('40'\)"),
    Row("index-manifest-list-for-dict", lambda c: edit_manifest(c, lambda m: m.update(files=list(m["files"]))), 1,
        r"key 'files' must be an object"),
    Row("index-manifest-nested-type", lambda c: edit_manifest(c, lambda m: m["model"].update(embed_dim=[64])), 1,
        r"key 'model\.embed_dim' must be a whole number"),
    # outputs in odd places
    Row("out-inside-faces", lambda c: out_inside(c, "faces"), 2, r"--out .* is inside the faces folder"),
    Row("out-is-the-index-dir", lambda c: out_inside(c, "index"), 2, r"--out .* is the index dir"),
    Row("out-inside-the-index-dir", lambda c: out_inside(c, "index-sub"), 2, r"--out .* is inside the index dir"),
    Row("out-inside-the-store", lambda c: out_inside(c, "store"), 2, r"--out .* is inside the index dir"),
    Row("out-holds-the-store", store_inside_out, 2, r"the embedding store .* is inside --out .*replaced whole"),
    Row("index-inside-faces", index_inside_faces, 2, r"--index-dir .* is inside the faces folder"),
    Row("out-is-a-symlink", out_is_a_symlink, 2, r"--out .* is a symbolic link"),
    # markup-looking paths, overlong names, photos whose cost the attacker picks
    Row("markup-in-error-path", bracketed_faces_missing, 2, r"faces folder .*\[bold\]faces\[/x\] does not exist"),
    Row("names-line-too-long", lambda c: names_file(c, "Anna Smith\n" + "A" * 70_000 + "\n", 2), 2,
        r"line is longer than 65536 bytes"),
    Row("names-name-too-long", lambda c: names_file(c, "Anna Smith\n" + "Anna " * 60 + "\n", 2), 2,
        r"has 299 characters; a name may have at most 256"),
    Row("faces-csv-name-too-long", lambda c: c.query(None, "--manifest", manifest_csv(c, [("a.png", "B" * 300)])), 2,
        r"images\.csv:2: name .* has 300 characters"),
    Row("faces-photo-wide-strip", lambda c: c.query(c.faces_with("strip.png", wide_png)), 0,
        r"400000 x 1 pixels is not the shape of a photo", "skipped"),
]


@pytest.mark.parametrize("row", [P(r, id=r.id, marks=r.marks) for r in ROWS])
def test_bad_input(row: Row, tmp_path, built, monkeypatch):
    ctx = Ctx(tmp_path / "row", built)
    ctx.tmp.mkdir()
    try:
        needs_patch = "monkeypatch" in row.setup.__code__.co_varnames[:row.setup.__code__.co_argcount]
        argv = row.setup(ctx, monkeypatch) if needs_patch else row.setup(ctx)
        before = snapshot(ctx.tmp)
        result = invoke(*argv)
        after = snapshot(ctx.tmp)
    finally:
        for p in ctx.tmp.rglob("*"):  # let pytest clean up what a row locked
            if not p.is_symlink():
                p.chmod(0o755)
    output = result.output
    assert "Traceback" not in output and (result.exception is None or isinstance(result.exception, SystemExit)), \
        f"{row.id}: {result.exception!r}\n{output}"
    assert result.exit_code == row.exit, f"{row.id}: exit {result.exit_code}\n{output}"
    assert not leftovers(ctx.tmp), leftovers(ctx.tmp)

    if row.kind == "error":
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{row.id}: not one error line: {lines}"
        assert re.search(row.pattern, lines[0]), f"{row.id}: {row.pattern!r} not in {lines[0]!r}"
        for part in ctx.expect:
            assert part in lines[0], f"{row.id}: {part!r} not named in {lines[0]!r}"
        if row.may_write:
            after = {k: v for k, v in after.items() if not k.startswith(row.may_write)}
            before = {k: v for k, v in before.items() if not k.startswith(row.may_write)}
        assert after == before, f"{row.id}: the failed command changed files: {set(after.items()) ^ set(before.items())}"
        return

    if row.kind == "warning":
        assert re.search(row.pattern, result.stderr), f"{row.id}: {row.pattern!r} not in stderr {result.stderr!r}"
        return
    report = ctx.tmp / "report"
    summary = json.loads((report / "summary.json").read_text(encoding="utf-8"))
    if row.kind == "ok" and row.pattern:
        assert re.search(row.pattern, output), f"{row.id}: {row.pattern!r} not in {output!r}"
    with open(report / "persons.csv", newline="", encoding="utf-8") as f:
        persons = {r["name"]: r for r in csv.DictReader(f)}
    skipped = {s["path"]: s["reason"] for s in summary["skipped_files"]}
    if row.kind == "skipped":
        assert str(ctx.bad_file) in skipped, f"{row.id}: {ctx.bad_file} not in {skipped}"
        assert re.search(row.pattern, skipped[str(ctx.bad_file)]), skipped[str(ctx.bad_file)]
        assert int(persons[ctx.person]["n_images"]) == ctx.good  # decided from the other photos
        assert persons[ctx.person]["decision"] in ("member", "non-member")
        assert ctx.person not in summary["persons_without_images"]
    elif row.kind == "converted":
        assert skipped == {}, f"{row.id}: {skipped}"
        assert int(persons[ctx.person]["n_images"]) == ctx.good + 1
        images = (report / "predictions" / "images.csv").read_text(encoding="utf-8")
        assert str(ctx.bad_file) in images
    matched = {"faces-folder-same-tokens-as-index-name": "Björn  Costa",
               "faces-csv-name-same-tokens-as-index-name": "björn   COSTA"}
    if row.id in matched:  # the index's own entry, not a twin added beside it that would win no tie
        assert summary["persons_matched_by_tokens"] == [{"person": matched[row.id], "index_name": "Björn Costa"}]
        assert summary["candidates_added_for_this_run"] == [] and summary["counts"]["candidates"] == 40
        assert persons[matched[row.id]]["in_index"] == "yes"
    if row.id == "faces-added-names-longer-than-context":  # build-index's checks, recorded in summary.json
        lengths = summary["added_names_prompt_lengths"]
        assert lengths["names_checked"] == 2 and lengths["truncated_names"] == 2 and lengths["collision_groups"] == 21
        assert {n.replace(" ", "_") for n in lengths["collisions"][0]["names"]} == \
            {LONG_NAME + "_Smith", LONG_NAME + "_Jones"}
    if row.id == "faces-person-without-images":
        assert summary["persons_without_images"] == ["Nobody Here"]
    if row.id == "store-of-another-model":
        assert encode_counts(report) == (6, 0)  # nothing taken from the other model's embeddings
        from idia_engine.engine.query.store import EmbeddingStore

        with EmbeddingStore(ctx.tmp / "store") as s, s.env.begin() as txn:
            metas = [bytes(k) for k, _ in txn.cursor() if bytes(k).startswith(b"m")]
        assert len(metas) == 2  # two models, two namespaces, never mixed
    if row.id == "store-map-full":
        assert encode_counts(report) == (20, 0)
        assert (ctx.tmp / "store" / "data.mdb").stat().st_size > 16 << 10  # the map grew


@pytest.mark.parametrize("argv, message", [
    (["query", "--top-k", "abc"], r"^error: Invalid value for '--top-k': .*\(see 'idia-engine query --help'\)$"),
    (["query", "--device", "tpu"], r"^error: Invalid value for '--device': .*'tpu'"),
    (["demo", "--no-such-option"], r"^error: No such option: --no-such-option"),
    (["no-such-command"], r"^error: No such command 'no-such-command'"),
    (["build-index"], r"^error: Missing argument 'names_file'"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, message, monkeypatch, capsys):
    from idia_engine.cli.app import main

    monkeypatch.setattr("sys.argv", ["idia-engine", *argv])
    assert main() == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), lines


def test_markup_looking_paths_print_as_written(tmp_path, built):
    """Paths that read as rich markup ("[/x]" would crash rich after the work is done, "[bold]" would print a
    path that does not exist) are printed verbatim by every success message."""
    idx, faces = tmp_path / "idx[/x]", built["world"]["faces"]
    r = invoke("build-index", built["world"]["names_file"], "--index-dir", idx, *model_args(built["model"]), "-q")
    assert r.exit_code == 0 and f"index written to {idx}:" in " ".join(r.stdout.split()), r.output
    for out in (tmp_path / "rep[/x]", tmp_path / "[bold]rep"):
        r = invoke("query", faces, "--index-dir", idx, "--out", out, "--store", tmp_path / "store", "-q")
        assert r.exit_code == 0, r.output
        assert f"report: {out} (" in " ".join(r.stdout.split()), r.stdout
    r = invoke("names", "-n", "3", "-o", tmp_path / "n[/x][bold].txt")
    assert r.exit_code == 0 and str(tmp_path / "n[/x][bold].txt") in "".join(r.stdout.split()), r.output
