"""Several faces folders, --aliases, a FaceScrub-style --faces-list and --crop, on the small demo's trained
model and index. The oracle is always the existing path: the same photos as one faces folder (or a
--manifest), run as query ran them before these options existed."""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from idia_engine.cli.app import app
from idia_engine.engine.index.reader import open_index
from idia_engine.engine.model.load import load_model
from idia_engine.engine.query.images import choose_photos
from idia_engine.engine.query.inputs.crop import CropPlan, FaceBox, crop_fingerprint
from idia_engine.engine.query.run import QueryConfig, image_fingerprint, run_query
from idia_engine.engine.query.store import EmbeddingStore
from PIL import Image
from typer.testing import CliRunner

HEADER = "name\timage_id\tface_id\turl\tbbox\tsha256\tpath"


@dataclass
class Demo:
    work: Path
    tmp: Path
    model: object
    persons: list[str]  # 2 members the model knows and 2 non-members, sorted
    one: Path  # their held-out photos as one faces folder (copies of the demo's)


@pytest.fixture(scope="module")
def demo(small_demo, tmp_path_factory) -> Demo:
    work, _ = small_demo
    with open(work / "report" / "persons.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    members = sorted((r for r in rows if r["label"] == "member"), key=lambda r: -int(r["score"]))[:2]
    others = [r for r in rows if r["label"] == "non-member"][:2]
    persons = sorted(r["name"] for r in members + others)
    tmp = tmp_path_factory.mktemp("facescrub")
    one = tmp / "one"
    for p in persons:
        shutil.copytree(work / "faces" / folder(p), one / folder(p))
    with open_index(work / "index") as index:
        spec = index.manifest.model_info.as_spec()
    return Demo(work, tmp, load_model(spec, "cpu", "fp32"), persons, one)


def folder(name: str) -> str:
    return name.replace(" ", "_")


def query(demo: Demo, out: str, store: str, **options):
    config = QueryConfig(index_dir=demo.work / "index", out_dir=demo.tmp / out, store_dir=demo.tmp / store,
                         device="cpu", **options)
    return run_query(config, model=demo.model)


def read(report: Path, name: str) -> bytes:
    return (Path(report) / name).read_bytes()


def topk(report: Path) -> tuple[np.ndarray, np.ndarray]:
    return (np.load(Path(report) / "predictions" / "topk_ids.npy"),
            np.load(Path(report) / "predictions" / "topk_scores.npy"))


def images(report: Path) -> list[dict]:
    with open(Path(report) / "predictions" / "images.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_roots_with_misspelt_folders_and_aliases_score_as_one_folder(demo):
    p0, p1, p2, p3 = demo.persons
    a, b = demo.tmp / "roots" / "a", demo.tmp / "roots" / "b"
    shutil.copytree(demo.one / folder(p0), a / folder(p0))
    shutil.copytree(demo.one / folder(p1), b / folder(p1 + "x"))  # misspelt, only in b: its alias names it
    for person, b_name in ((p2, folder(p2 + "x")), (p3, folder(p3).upper())):  # split: first half in a
        files = sorted((demo.one / folder(person)).iterdir())
        (a / folder(person)).mkdir(parents=True)
        (b / b_name).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, (a / folder(person) if i < len(files) // 2 else b / b_name) / f.name)
    aliases = demo.tmp / "roots" / "aliases.csv"
    aliases.write_text(f"alias,name\n{p1}x,{p1}\n{p2}x,{p2}\nNobody Here,{p0}\n", encoding="utf-8")
    labels_as_named = demo.tmp / "roots" / "labels-true.csv"
    labels_misspelt = demo.tmp / "roots" / "labels-misspelt.csv"
    labels_as_named.write_text(f"name,member\n{p0},1\n{p1},0\n{p2},1\n", encoding="utf-8")
    labels_misspelt.write_text(f"name,member\n{p0},1\n{p1}x,0\n{p2},1\n", encoding="utf-8")

    oracle = query(demo, "r-one", "s-one", faces_dir=demo.one, labels_file=labels_as_named)
    merged = query(demo, "r-roots", "s-roots", faces_dir=a, extra_faces_dirs=(b,), aliases_file=aliases,
                   labels_file=labels_misspelt)

    assert "inputs" not in oracle.summary and "faces_roots" not in oracle.summary["parameters"]  # as before
    for name in ("persons.csv", "modes.csv"):
        assert read(merged.out_dir, name) == read(oracle.out_dir, name), name
    assert [r["sha256"] for r in images(merged.out_dir)] == [r["sha256"] for r in images(oracle.out_dir)]
    for x, y in zip(topk(merged.out_dir), topk(oracle.out_dir)):
        assert np.array_equal(x, y)
    s = merged.summary
    assert s["parameters"]["faces_roots"] == [str(a), str(b)] and s["parameters"]["source"] == f"{a} + {b}"
    assert {m["person"] for m in s["inputs"]["persons_merged"]} == {p2, p3}
    assert {(x["alias"], x["name"]) for x in s["inputs"]["aliases_applied"]} == {(p1 + "x", p1), (p2 + "x", p2)}
    assert s["inputs"]["aliases"] | {"file": None} == {"file": None, "listed": 3, "used": 2, "unused": 1,
                                                       "unused_aliases": ["Nobody Here"]}
    assert s["counts"]["persons"] == 4 and s["counts"]["candidates_added_for_this_run"] == 0
    # evaluate refuses an output inside any faces folder the report was made from (it reads faces_roots).
    result = CliRunner().invoke(app, ["evaluate", str(merged.out_dir), "--out", str(b / "evaluation")])
    assert result.exit_code == 2 and "inside the faces folder" in result.stderr, result.output


def pad(photo: Path, out: Path, at: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int, int, int]:
    """The photo pasted at `at` on a structured background of size `canvas`; returns its box."""
    img = Image.open(photo).convert("RGB")
    w, h = img.size
    yy, xx = np.mgrid[0:canvas[1], 0:canvas[0]]
    background = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3 + len(out.name)) % 256], -1)
    page = Image.fromarray(background.astype(np.uint8))
    page.paste(img, at)
    out.parent.mkdir(parents=True, exist_ok=True)
    page.save(out)
    return at[0], at[1], at[0] + w, at[1] + h


@pytest.fixture(scope="module")
def padded(demo):
    """FaceScrub's layout of the demo's photos, each pasted into a larger picture at a known box, with a faces
    list; plus a line whose file has other bytes than listed, a line whose file is missing, a box outside its
    photo, a box reaching past its photo's edge (clipped to the same face) and a file given by `path`."""
    root, elsewhere = demo.tmp / "scrub" / "actors", demo.tmp / "scrub" / "elsewhere"
    lines, used = [HEADER], []  # used: (person, padded file) of the lines whose whole file is a usable photo
    face = 0
    for person in demo.persons:
        n = folder(person)
        for i, photo in enumerate(sorted((demo.one / n).iterdir())):
            face += 1
            w, h = Image.open(photo).size
            canvas = (3 * w, 2 * h)
            at = (canvas[0] - w, canvas[1] - h) if i == 1 else (5 + face % 7, 3 + face % 5)
            target = (elsewhere / f"{n}-{i}.png") if i == 2 else root / n / f"{n}_{face}.png"
            box = list(pad(photo, target, at, canvas))
            if i == 1:  # past the right and bottom edges: clipped back to the pasted photo
                box[2], box[3] = box[2] + 9, box[3] + 13
            path = "" if i != 2 else str(target.relative_to(demo.tmp / "scrub"))
            lines.append(f"{person}\t{face}\t{face}\thttp://example.org/{face}.jpg\t{','.join(map(str, box))}\t"
                         f"{sha256(target)}\t{path}")
            used.append((person, target))
            if i == 0:  # the same file, a box with no pixel of it: skipped when cropping
                lines.append(f"{person}\t{face}\t{face + 1000}\thttp://x\t{canvas[0] + 5},0,{canvas[0] + 20},9\t"
                             f"{sha256(target)}\t{target.relative_to(demo.tmp / 'scrub')}")
    p0 = folder(demo.persons[0])
    wrong = root / p0 / f"{p0}_5000.png"
    pad(next((demo.one / p0).iterdir()), wrong, (1, 1), (100, 100))
    lines.append(f"{demo.persons[0]}\t5000\t5000\thttp://x\t1,1,49,49\t{'0' * 64}\t")
    lines.append(f"{demo.persons[1]}\t6000\t6000\thttp://x\t1,1,49,49\t{'1' * 64}\t")  # no such file
    faces_list = demo.tmp / "scrub" / "facescrub_actors.txt"
    faces_list.write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest = demo.tmp / "scrub" / "used.csv"  # the usable whole files, as the existing --manifest reads them
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "name"])
        w.writerows([(str(t), p) for p, t in used])
    return {"root": root, "list": faces_list, "manifest": manifest, "wrong": wrong, "missing_line": len(lines)}


def test_faces_list_skips_other_bytes_and_missing_files_and_uses_the_rest(demo, padded):
    listed = query(demo, "r-list", "s-list", faces_dir=padded["root"], faces_list=padded["list"])
    manifest = query(demo, "r-manifest", "s-manifest", image_manifest=padded["manifest"])
    skipped = {s["path"]: s["reason"] for s in listed.summary["skipped_files"]}
    assert skipped[str(padded["wrong"])] == "sha256 differs from the faces list"
    missing = f"{padded['list']}:{padded['missing_line']}"
    assert missing in skipped and "not found: looked for" in skipped[missing]
    assert len(skipped) == 2
    assert listed.summary["inputs"]["faces_list"] | {"file": None} == {
        "file": None, "faces_listed": 4 * 12 + 4 + 2, "faces_found": 4 * 12 + 4, "not_found": 1, "sha256_differs": 1}
    # Without --crop a photo is its whole file: the list's second box of a file is a copy of that photo.
    assert listed.summary["counts"]["duplicate_photos_dropped"] == 4
    for name in ("persons.csv", "modes.csv"):
        assert read(listed.out_dir, name) == read(manifest.out_dir, name), name
    for x, y in zip(topk(listed.out_dir), topk(manifest.out_dir)):
        assert np.array_equal(x, y)


def test_crop_of_a_pasted_photo_is_the_photo_bit_for_bit(demo, padded):
    """The crop of a photo pasted at its box is that photo's pixels, so its embedding (fp32, same batches) is
    bitwise the original's; a box past the edge is clipped, one outside the photo skips that photo."""
    oracle = query(demo, "r-orig", "s-orig", faces_dir=demo.one)
    cropped = query(demo, "r-crop", "s-crop", faces_dir=padded["root"], faces_list=padded["list"], crop=True)
    for name in ("persons.csv", "modes.csv"):
        assert read(cropped.out_dir, name) == read(oracle.out_dir, name), name
    for x, y in zip(topk(cropped.out_dir), topk(oracle.out_dir)):
        assert np.array_equal(x, y)
    skipped = {s["path"]: s["reason"] for s in cropped.summary["skipped_files"]}
    outside = [r for r in skipped.values() if "holds no pixel of the" in r]
    assert len(outside) == 4 and cropped.summary["counts"]["duplicate_photos_dropped"] == 0
    with open(cropped.out_dir / "predictions" / "crops.csv", newline="", encoding="utf-8") as f:
        crops = list(csv.DictReader(f))
    rows = images(cropped.out_dir)
    assert [c["file_sha256"] for c in crops] == [sha256(Path(r["path"])) for r in rows]
    with EmbeddingStore(demo.tmp / "s-crop") as a, EmbeddingStore(demo.tmp / "s-orig") as b:
        fp = image_fingerprint(demo.model)
        dim = demo.model.info.embed_dim
        ns_crop, ns_file = a.namespace(crop_fingerprint(fp), dim), b.namespace(fp, dim)
        assert np.array_equal(a.get_many(ns_crop, [r["sha256"] for r in rows]),
                              b.get_many(ns_file, [r["sha256"] for r in images(oracle.out_dir)]))
        assert a.count(a.namespace(fp, dim)) == 0  # nothing under the whole files' keys


def test_cropped_and_whole_runs_on_one_store_share_nothing(demo, padded):
    fresh_whole = query(demo, "r-fresh-whole", "s-fresh-whole", faces_dir=padded["root"], faces_list=padded["list"])
    fresh_crop = query(demo, "r-fresh-crop", "s-fresh-crop", faces_dir=padded["root"], faces_list=padded["list"],
                       crop=True)
    runs = [query(demo, f"r-shared-{i}", "s-shared", faces_dir=padded["root"], faces_list=padded["list"], crop=crop)
            for i, crop in enumerate((False, True, False))]
    n = fresh_whole.summary["counts"]["images_used"]
    assert runs[1].summary["counts"]["images_used"] == n  # the same number of photos, other pixels
    assert [r.run["images_encoded"] for r in runs] == [n, n, 0]  # the crops found none of the files' embeddings
    assert [r.run["images_from_cache"] for r in runs] == [0, 0, n]
    for run, fresh in zip(runs, (fresh_whole, fresh_crop, fresh_whole)):
        for x, y in zip(topk(run.out_dir), topk(fresh.out_dir)):
            assert np.array_equal(x, y)
    assert not np.array_equal(topk(runs[0].out_dir)[1], topk(runs[1].out_dir)[1])  # whole files are not crops


def test_one_file_with_two_boxes_is_two_photos(tmp_path):
    photo = tmp_path / "p.png"
    Image.new("RGB", (20, 20), (10, 20, 30)).save(photo)
    boxes = [FaceBox(0, 0, 10, 10), FaceBox(5, 5, 15, 15), FaceBox(0, 0, 10, 10)]
    plan = CropPlan({"A": boxes})
    chosen = choose_photos("A", [photo] * 3, None, 0, photo_key=plan.photo_key("A"))
    assert len(chosen.paths) == 2 and len(set(chosen.shas)) == 2 and len(chosen.duplicates) == 1
    assert {plan.faces[k][1] for k in chosen.shas} == {boxes[0], boxes[1]}
    whole = choose_photos("A", [photo] * 3, None, 0)
    assert len(whole.paths) == 1 and whole.shas == [sha256(photo)]


@pytest.mark.parametrize("box, size, expected", [
    (FaceBox(2, 3, 8, 9), (10, 10), (2, 3, 8, 9)),
    (FaceBox(-4, -1, 5, 12), (10, 10), (0, 0, 5, 10)),
    (FaceBox(10, 0, 14, 5), (10, 10), None),
    (FaceBox(3, 3, 3, 8), (10, 10), None),
    (FaceBox(6, 2, 4, 8), (10, 10), None),
])
def test_face_boxes_are_clipped_to_the_photo(box, size, expected):
    assert box.clipped(*size) == expected


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _faces_list(lines: list[str]) -> str:
    return "\n".join(["name\timage_id\tface_id\turl\tbbox\tsha256", *lines]) + "\n"


GOOD = f"Ann Lee\t1\t1\thttp://x\t1,2,30,40\t{'a' * 64}"
BAD_INPUTS = [
    ("aliases-no-name-column", ["--aliases", ("aliases.csv", "alias,nom\nA B,C D\n")],
     r"aliases file .*aliases\.csv has no column 'name'"),
    ("aliases-empty-alias", ["--aliases", ("aliases.csv", "alias,name\n,C D\n")], r"aliases\.csv:2: empty alias"),
    ("aliases-two-names", ["--aliases", ("aliases.csv", "alias,name\nA B,C D\na b,E F\n")],
     r"aliases\.csv:3: alias 'a b' is listed with two names \('C D' on line 2"),
    ("aliases-chain", ["--aliases", ("aliases.csv", "alias,name\nA B,C D\nC D,E F\n")],
     r"aliases\.csv:2: alias 'A B' stands for 'C D', which is itself an alias \(of 'E F', line 3\)"),
    ("labels-both-ways-through-aliases", ["--aliases", ("aliases.csv", "alias,name\nA B,C D\n"),
                                          "--labels", ("labels.csv", "name,member\nA B,1\nC D,0\n")],
     r"labels file .* labels 'A B' and 'C D' differently"),
    ("faces-list-no-sha256", ["--faces-list", ("list.txt", "name\timage_id\tface_id\turl\tbbox\nA\t1\t1\tu\t1,1,2,2\n")],
     r"list\.txt:1: faces list has no column 'sha256'"),
    ("faces-list-fields", ["--faces-list", ("list.txt", _faces_list([GOOD, "Ann Lee\t2\t2\tu\t1,2,3,4"]))],
     r"list\.txt:3: 5 tab-separated fields, the header has 6"),
    ("faces-list-bbox", ["--faces-list", ("list.txt", _faces_list([GOOD.replace("1,2,30,40", "1,2,30")]))],
     r"list\.txt:2: bbox '1,2,30' is not x1,y1,x2,y2"),
    ("faces-list-sha256", ["--faces-list", ("list.txt", _faces_list([GOOD.replace("a" * 64, "xyz")]))],
     r"list\.txt:2: sha256 'xyz' is not 64 hex digits"),
    ("faces-list-face-id", ["--faces-list", ("list.txt", _faces_list([GOOD.replace("\t1\t1\t", "\t1\tone\t")]))],
     r"list\.txt:2: face_id 'one' is not a whole number"),
    ("faces-list-name-case", ["--faces-list", ("list.txt", _faces_list([GOOD, GOOD.replace("Ann Lee", "ann lee")]))],
     r"list\.txt:3: name 'ann lee' differs only in letter case from 'Ann Lee' \(line 2\)"),
    ("crop-without-faces-list", ["--crop"], r"--crop needs --faces-list"),
    ("root-twice", [("faces",)], r"faces folder .*faces is given twice"),
    ("root-inside-root", [("faces/Ann_Lee",)], r"faces folder .*Ann_Lee lies inside faces folder"),
]


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_inputs_are_one_line_and_write_nothing(row, demo, tmp_path):
    _, extra, pattern = row
    faces = tmp_path / "faces"
    shutil.copytree(demo.one / folder(demo.persons[0]), faces / "Ann_Lee")
    argv = ["query", str(faces)]
    for item in extra:
        if isinstance(item, tuple) and len(item) == 2:
            argv.append(str(_write(tmp_path / item[0], item[1])))
        elif isinstance(item, tuple):
            argv.append(str(tmp_path / item[0]))
        else:
            argv.append(item)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, [*argv, "--index-dir", str(demo.work / "index"), "--out",
                                      str(tmp_path / "report"), "--store", str(tmp_path / "store"), "--quiet"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(pattern, lines[0]), lines[0]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no report, no store, nothing else

