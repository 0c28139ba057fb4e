"""The whole flow through the real typer app, checked against an independent dense oracle."""

from __future__ import annotations

import csv
import html
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from idia_engine.cli.app import app
from idia_engine.engine.candidates.templates import PAPER_TEMPLATES
from idia_engine.engine.query.report import load_predictions
from PIL import Image
from typer.testing import CliRunner

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def read_persons(report: Path) -> dict[str, dict[str, str]]:
    with open(report / "persons.csv", newline="", encoding="utf-8") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def model_args(tiny_model_files) -> list[str]:
    config, ckpt = tiny_model_files
    return ["--model", str(config), "--pretrained", str(ckpt)]


# --- the oracle: stock open_clip, a dense similarity matrix, Counter votes --------------------------


def oracle_scores(tiny_model_files, candidates: list[str], people_images: dict[str, list[Path]],
                  templates=PAPER_TEMPLATES) -> dict[str, int]:
    """Paper mode, written plainly and independently of the engine."""
    config, ckpt = tiny_model_files
    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(ckpt))
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    scores = {}
    with torch.no_grad():
        text = [torch.nn.functional.normalize(
            model.encode_text(tokenizer([t.replace("{0}", n) for n in candidates])), dim=-1) for t in templates]
        for person, paths in people_images.items():
            pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
            img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
            score = 0
            for t in range(len(templates)):
                predicted = [candidates[int(i)] for i in (img @ text[t].T).argmax(dim=1)]
                counts = Counter(predicted).most_common()
                unique_top = len(counts) == 1 or counts[0][1] > counts[1][1]
                score += int(unique_top and counts[0][0] == person)
            scores[person] = score
    return scores


@pytest.fixture
def small_world(tmp_path, world):
    """Few candidates, so the random-weight model hits true names often and scores spread over 0..21."""
    names = world["names"][:7]
    names_file = tmp_path / "names.txt"
    names_file.write_text("# candidates\n\n" + "\n".join(names) + "\n" + names[0] + "\n", encoding="utf-8")
    return {**world, "names": names, "names_file": names_file}


def test_build_and_query_match_the_dense_oracle(tmp_path, small_world, tiny_model_files):
    idx, report = tmp_path / "idx", tmp_path / "report"
    r = ok("build-index", small_world["names_file"], "--index-dir", idx, *model_args(tiny_model_files), "-q")
    assert "1 duplicate name(s) dropped" in r.output
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["num_names"] == 7 and manifest["num_templates"] == 21
    assert manifest["templates"] == list(PAPER_TEMPLATES)
    assert manifest["model"]["weights_source"] == "checkpoint" and len(manifest["model"]["fingerprint"]) == 64

    ok("query", small_world["faces"], "--index-dir", idx, "--out", report, "-q")
    persons = read_persons(report)
    people_images = {p: sorted((small_world["faces"] / p.replace(" ", "_")).glob("*.png")) for p in small_world["people"]}
    expected = oracle_scores(tiny_model_files, small_world["names"], people_images)
    assert {p: int(row["score"]) for p, row in persons.items()} == expected
    assert {row["decision"] for row in persons.values()} <= {"member", "non-member"}
    for p, row in persons.items():
        assert row["decision"] == ("member" if expected[p] >= 1 else "non-member")
        assert int(row["n_images"]) == 4
    assert len(set(expected.values())) > 1, "the oracle comparison needs varied scores to mean something"

    preds = load_predictions(report)
    assert preds.topk_ids.shape == (20, 21, 7) and preds.topk_scores.dtype == np.float32
    assert (np.diff(preds.topk_scores, axis=2) <= 0).all()  # best first
    summary = json.loads((report / "summary.json").read_text())
    run = json.loads((report / "run.json").read_text())
    assert summary["counts"]["images_used"] == 20 and run["images_encoded"] == 20
    assert set(run["timings_s"]) >= {"hash", "encode images", "search", "decide"}
    assert "timings_s" not in summary and "created_at" not in summary  # summary.json: the inputs' function


def test_second_query_is_a_cache_hit_with_identical_output(tmp_path, world, tiny_model_files):
    idx = tmp_path / "idx"
    ok("build-index", world["names_file"], "--index-dir", idx, *model_args(tiny_model_files), "-q")
    ok("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r1", "-q", "--workers", "2")
    ok("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r2", "-q")
    s1 = json.loads((tmp_path / "r1" / "run.json").read_text())
    s2 = json.loads((tmp_path / "r2" / "run.json").read_text())
    assert s1["images_encoded"] == 20 and s2["images_encoded"] == 0
    assert s2["images_from_cache"] == 20
    for f in ("persons.csv", "modes.csv", "predictions/topk_ids.npy", "predictions/topk_scores.npy",
              "predictions/images.csv", "predictions/candidates.txt", "predictions/topk.csv",
              "predictions/topk.parquet"):
        assert (tmp_path / "r1" / f).read_bytes() == (tmp_path / "r2" / f).read_bytes(), f
    sum1, sum2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("r1", "r2"))
    assert sum1["parameters"].pop("workers") == 2 and sum2["parameters"].pop("workers") == 0
    assert sum1 == sum2  # everything but the arguments that differ
    # Rerunning into the same report directory replaces it, its evaluation included ...
    ok("evaluate", tmp_path / "r1", "--labels", _all_members(tmp_path, world), "--n", "1", "--draws", 2, "-q")
    ok("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r1", "-q")
    # ... but never a file of the user's put there since: the replacement would delete it.
    (tmp_path / "r1" / "my notes.txt").write_text("mine", encoding="utf-8")
    r = invoke("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r1", "-q")
    assert r.exit_code == 2 and "holds my notes.txt, which no report or its evaluation writes" in r.stderr
    assert (tmp_path / "r1" / "my notes.txt").read_text(encoding="utf-8") == "mine"


def _all_members(tmp_path: Path, world) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text("name,member\n" + "".join(f"{p},{i % 2}\n" for i, p in enumerate(world["people"])),
                    encoding="utf-8")
    return path


def test_labels_metrics_subsets_and_missing_names(tmp_path, world, tiny_model_files):
    names_without_first = world["names"][1:]
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(names_without_first) + "\n", encoding="utf-8")
    idx = tmp_path / "idx"
    ok("build-index", names_file, "--index-dir", idx, *model_args(tiny_model_files), "-q")
    labels = tmp_path / "labels.csv"
    people = world["people"]
    labels.write_text("name,member\n" + "".join(f"{p},{'yes' if i < 2 else 'no'}\n" for i, p in enumerate(people))
                      + "Somebody Else,1\n", encoding="utf-8")

    r = invoke("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "strict", "--strict", "-q")
    assert r.exit_code == 2 and people[0] in r.output and "Traceback" not in r.output

    ok("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r", "--labels", labels,
       "--images-per-person", 2, "--seed", 7, "--tau", 2, "-q")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["candidates_added_for_this_run"] == [people[0]]
    assert summary["counts"]["candidates"] == len(world["names"])
    persons = read_persons(tmp_path / "r")
    assert persons[people[0]]["in_index"] == "no" and persons[people[1]]["in_index"] == "yes"
    assert all(int(row["n_images"]) == 2 for row in persons.values())
    # The metrics agree with persons.csv.
    m = summary["metrics"]
    tp = sum(1 for row in persons.values() if row["decision"] == "member" and row["label"] == "member")
    fn = sum(1 for row in persons.values() if row["decision"] == "non-member" and row["label"] == "member")
    assert (m["TP"], m["FN"], m["members"], m["non_members"]) == (tp, fn, 2, 3)
    assert all((row["decision"] == "member") == (int(row["score"]) >= 2) for row in persons.values())
    assert summary["labels"]["labels_for_unknown_names"] == ["Somebody Else"]
    # The report page names the model as a regulator asks first: architecture, weights, fingerprint, templates,
    # candidates, index and exactness, and the command line of the query.
    ok("evaluate", tmp_path / "r", "--n", "1,2", "--draws", 2, "-q")
    page = (tmp_path / "r" / "evaluation" / "report.html").read_text(encoding="utf-8")
    card = dict(re.findall(r"<tr><th>([^<]*)</th><td>([^<]*)</td></tr>", page))
    assert card["weights fingerprint (SHA-256)"] == summary["model"]["fingerprint"]
    assert card["prompt templates"].startswith("21: " + html.escape(PAPER_TEMPLATES[0]))
    assert card["candidate names"] == f"{len(world['names'])} (1 added for this run)"
    assert card["name index"].startswith("flat, build ") and card["exactness"].startswith("every decision equals")
    assert card["command line"].startswith("idia-engine query ") and "--tau 2" in card["command line"]
    # The seeded draw is reproducible and depends on the seed.
    chosen = lambda d: [r["path"] for r in load_predictions(d).images]  # noqa: E731
    ok("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r_same", "--images-per-person", 2,
       "--seed", 7, "-q")
    ok("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r_other", "--images-per-person", 2,
       "--seed", 8, "-q")
    assert chosen(tmp_path / "r") == chosen(tmp_path / "r_same") != chosen(tmp_path / "r_other")

    # The added name is scored exactly: the report matches the oracle over all 40 candidates.
    subset = {p: [Path(r["path"]) for r in load_predictions(tmp_path / "r").images if r["name"] == p] for p in people}
    assert {p: int(persons[p]["score"]) for p in people} == \
        {p: s for p, s in oracle_scores(tiny_model_files, names_without_first + [people[0]], subset).items()}


def test_image_manifest_csv_and_skipped_files(tmp_path, world, tiny_model_files):
    idx = tmp_path / "idx"
    ok("build-index", world["names_file"], "--index-dir", idx, *model_args(tiny_model_files), "-q")
    faces = tmp_path / "faces"
    import shutil
    shutil.copytree(world["faces"], faces)
    person_dir = faces / world["people"][0].replace(" ", "_")
    (person_dir / "notes.txt").write_text("not an image")
    (person_dir / "empty.jpg").write_bytes(b"")
    good = next(person_dir.glob("*.png")).read_bytes()
    (person_dir / "truncated.png").write_bytes(good[: len(good) // 2])
    r = ok("query", faces, "--index-dir", idx, "--out", tmp_path / "r", "-q")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped_files"]}
    assert set(reasons) == {"notes.txt", "empty.jpg", "truncated.png"}
    assert "empty" in reasons["empty.jpg"] and "decodable" in reasons["notes.txt"]
    assert summary["counts"]["images_used"] == 20 and "3 skipped" in r.output

    manifest = tmp_path / "images.csv"
    rows = [(str(p.relative_to(tmp_path)), p.parent.name.replace("_", " ")) for p in sorted(faces.rglob("*.png"))]
    manifest.write_text("path,name\n" + "".join(f"{a},{b}\n" for a, b in rows), encoding="utf-8")
    ok("query", "--manifest", manifest, "--index-dir", idx, "--out", tmp_path / "r2", "-q")
    assert (tmp_path / "r" / "persons.csv").read_text() == (tmp_path / "r2" / "persons.csv").read_text()


def test_overwrite_and_a_crashed_build_leave_a_loadable_index(tmp_path, world, tiny_model_files, monkeypatch):
    idx = tmp_path / "idx"
    args = ["build-index", world["names_file"], "--index-dir", idx, *model_args(tiny_model_files), "-q"]
    ok(*args)
    first = json.loads((idx / "manifest.json").read_text())["build_id"]
    ok(*args)  # the same inputs again: nothing to do, the index stays
    assert json.loads((idx / "manifest.json").read_text())["build_id"] == first
    (tmp_path / "fewer.txt").write_text("\n".join(world["names"][:10]) + "\n", encoding="utf-8")
    r = invoke(*[a if a != world["names_file"] else tmp_path / "fewer.txt" for a in args])
    assert r.exit_code == 2 and "--overwrite" in r.output  # other inputs: only with --overwrite
    ok("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r", "-q")

    from idia_engine.indexes.flat import FlatIPBackend
    calls = {"n": 0}
    real_save = FlatIPBackend.save

    def crash_on_fifth(self, path):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of the build
        real_save(self, path)

    monkeypatch.setattr(FlatIPBackend, "save", crash_on_fifth)
    r = invoke(*args, "--overwrite")
    assert r.exit_code == 130
    monkeypatch.setattr(FlatIPBackend, "save", real_save)
    assert json.loads((idx / "manifest.json").read_text())["build_id"] == first  # the old index, whole
    assert sorted(p.name for p in idx.iterdir() if p.name.startswith("data-")) == [f"data-{first}"]
    ok("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r2", "-q")

    ok(*args, "--overwrite")
    second = json.loads((idx / "manifest.json").read_text())["build_id"]
    assert second != first and not (idx / f"data-{first}").exists()
    leftovers = [p.name for p in idx.iterdir()
                 if p.name not in ("manifest.json", ".build.lock", "image-store", f"data-{second}")]
    assert leftovers == []
    r = ok("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r3", "-q")
    assert "0 encoded, 20 from cache" in r.output  # the store survives a rebuild with the same model


def test_interrupted_encoding_resumes_after_the_last_committed_batch(tmp_path, world, tiny_model_files, monkeypatch):
    from idia_engine.engine.model.load import LoadedModel

    idx = tmp_path / "idx"
    ok("build-index", world["names_file"], "--index-dir", idx, *model_args(tiny_model_files), "-q")
    real = LoadedModel.encode_images
    calls = {"n": 0}

    def fail_on_third_batch(self, pixels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, pixels)

    monkeypatch.setattr(LoadedModel, "encode_images", fail_on_third_batch)
    r = invoke("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r", "--batch-size", 4, "-q")
    assert r.exit_code == 130 and not (tmp_path / "r").exists()
    monkeypatch.setattr(LoadedModel, "encode_images", real)
    ok("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r", "--batch-size", 4, "-q")
    counts = json.loads((tmp_path / "r" / "run.json").read_text())
    assert counts["images_from_cache"] == 8 and counts["images_encoded"] == 12


def test_weights_changed_after_build_fail_fast(tmp_path, world):
    from idia_engine.engine.demo.tiny_model import write_tiny_model

    config, ckpt = write_tiny_model(tmp_path / "m", seed=3)
    idx = tmp_path / "idx"
    ok("build-index", world["names_file"], "--index-dir", idx, "--model", config, "--pretrained", ckpt, "-q")
    _, other = write_tiny_model(tmp_path / "m2", seed=4)
    ckpt.write_bytes(other.read_bytes())
    r = invoke("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r", "-q")
    assert r.exit_code == 1 and "fingerprint" in r.output and "rebuild" in r.output


# --- bad input: one line, no traceback, non-zero exit ---------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory, world, tiny_model_files):
    root = tmp_path_factory.mktemp("built")
    ok("build-index", world["names_file"], "--index-dir", root / "idx", *model_args(tiny_model_files), "-q")
    return root


def _bad_inputs(root: Path, world, tiny_model_files):
    files = root / "files"
    files.mkdir(exist_ok=True)
    (files / "empty.txt").write_text("")
    (files / "comments.txt").write_text("# only\n\n# comments\n")
    (files / "latin1.txt").write_bytes("Anna\nJos\xe9 Garc\xeda\n".encode("latin-1"))
    (files / "tab.txt").write_text("Anna Smith\nJohn\tDoe\n")
    (files / "tpl.txt").write_text("a photo of someone\n")
    (files / "labels.csv").write_text("name,member\nAnna,maybe\n")
    (files / "nocol.csv").write_text("name,is_member\nAnna,1\n")
    (files / "notempty").mkdir(exist_ok=True)
    (files / "notempty" / "x.txt").write_text("x")
    idx = root / "idx"
    m = model_args(tiny_model_files)
    b = ["build-index", "--index-dir", root / "new-idx", *m, "-q"]
    q = ["query", "--index-dir", idx, "--out", root / "rep", "-q"]
    return [
        (["build-index", files / "missing.txt", "--index-dir", root / "i1", *m], 2, "does not exist"),
        ([*b, files], 2, "not a regular file"),
        ([*b, files / "empty.txt"], 2, "holds no name"),
        ([*b, files / "comments.txt"], 2, "holds no name"),
        ([*b, files / "latin1.txt"], 2, "latin1.txt:2: not valid UTF-8"),
        ([*b, files / "tab.txt"], 2, "tab.txt:2"),
        ([*b, world["names_file"], "--templates", files / "tpl.txt"], 2, "tpl.txt:1"),
        ([*b, world["names_file"], "--templates", files / "nope.txt"], 2, "does not exist"),
        ([*b, world["names_file"], "--index", "hnsw-nope"], 2, "is neither auto, flat, dense nor a valid faiss factory"),
        (["build-index", world["names_file"], "--index-dir", files / "notempty", *m], 2, "not empty"),
        (["build-index", world["names_file"], "--index-dir", root / "i2", "--model", "No-Such"], 2, "unknown model"),
        (["build-index", world["names_file"], "--index-dir", root / "i3"], 1, "not in the local cache"),
        ([*q, root / "nofaces"], 2, "does not exist"),
        ([*q, files / "notempty"], 2, "holds no person folder"),
        ([*q], 2, "exactly one"),
        ([*q, world["faces"], "--manifest", files / "labels.csv"], 2, "exactly one"),
        (["query", world["faces"], "--index-dir", root / "noidx", "--out", root / "rep"], 2, "does not exist"),
        (["query", world["faces"], "--index-dir", files, "--out", root / "rep"], 1, "holds no manifest.json"),
        ([*q, world["faces"], "--labels", files / "labels.csv"], 2, "labels.csv:2"),
        ([*q, world["faces"], "--labels", files / "nocol.csv"], 2, "no column 'member'"),
        ([*q, world["faces"], "--tau", "22"], 2, "exceeds the number of templates"),
        # tau 0 would make a person without any usable photo a member: the same rule as evaluate's.
        ([*q, world["faces"], "--tau", "0"], 2, "--tau must be >= 1, got 0; use 1..21"),
        ([*q, world["faces"], "--top-k", "0"], 2, "--top-k must be >= 1"),
        (["query", world["faces"], "--index-dir", idx, "--out", files / "notempty"], 2, "not an idia-engine report"),
        ([*q, world["faces"], "--device", "tpu"], 2, "tpu"),
    ]


def test_bad_input_gives_one_line_and_an_exit_code(built, world, tiny_model_files):
    cases = _bad_inputs(built, world, tiny_model_files)
    if torch.cuda.is_available():
        cases = [c for c in cases if "cuda" not in c[2]]
    for args, code, needle in cases:
        r = invoke(*args)
        assert r.exit_code == code, (args, r.output)
        assert needle in r.output, (args, r.output)
        assert "Traceback" not in r.output, (args, r.output)
    assert not (built / "new-idx" / "manifest.json").exists()  # nothing half-written
    assert not (built / "rep").exists()


def test_manifest_edited_or_corrupt_index_is_refused(tmp_path, world, tiny_model_files):
    idx = tmp_path / "idx"
    ok("build-index", world["names_file"], "--index-dir", idx, *model_args(tiny_model_files), "-q")
    manifest = json.loads((idx / "manifest.json").read_text())
    data = idx / manifest["data_dir"]
    (data / "template_03.faiss").write_bytes((data / "template_03.faiss").read_bytes()[:-100])
    r = invoke("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r", "-q")
    assert r.exit_code == 1 and "template_03.faiss" in r.output
    manifest["schema_version"] = 99
    (idx / "manifest.json").write_text(json.dumps(manifest))
    r = invoke("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r", "-q")
    assert r.exit_code == 1 and "schema version 99" in r.output


def test_help_texts_list_every_command():
    r = ok("--help")
    for command in ("build-index", "query", "demo", "evaluate", "names"):
        assert command in r.output
    assert "--pretrained" in ok("build-index", "--help").output
    assert "--images-per-person" in ok("query", "--help").output
