"""clip-retrieval's layout: `export` read back by embedding-reader equals what the index and the store hold;
`query --embeddings` on the exported photos gives the demo's own report; every bad folder is one line and
writes nothing."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embedding_reader import EmbeddingReader
from idia_engine.cli.app import app
from idia_engine.engine.index.reader import open_index
from idia_engine.engine.query.run import image_fingerprint_of
from idia_engine.engine.query.store import EmbeddingStore
from typer.testing import CliRunner

runner = CliRunner()
ROWS_PER_FILE = 500  # 21 x 300 prompts: 13 name shards (past 10, where a string sort reorders them); 2 photo shards
REPORT_FILES = ["persons.csv", "modes.csv", "predictions/images.csv", "predictions/topk_ids.npy",
                "predictions/topk_scores.npy", "predictions/top1_status.npy", "predictions/topk.parquet"]


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo(small_demo):
    work, _ = small_demo
    with open_index(work / "index") as index:
        manifest = index.manifest
    return {"work": work, "index": work / "index", "report": work / "report", "manifest": manifest,
            "fingerprint": manifest.model_info.fingerprint, "model": manifest.model_info.model}


@pytest.fixture(scope="module")
def exported(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "export"
    result = _cli("export", demo["index"], "-o", out, "--report", demo["report"], "--rows-per-file", ROWS_PER_FILE,
                  "-q")
    assert result.exit_code == 0, result.output
    return out


def _read_all(folder: Path, kind: str, columns: list[str]):
    """Every row through embedding-reader, as the field reads this layout: (float32 rows, metadata frame)."""
    reader = EmbeddingReader(str(folder / kind), file_format="parquet_npy", embedding_column="embedding",
                             metadata_folder=str(folder / "metadata"), meta_columns=columns)
    parts = list(reader(batch_size=10**6, show_progress=False))
    assert len(parts) == 1
    return parts[0]


def test_export_names_equal_the_index_rows(demo, exported):
    sidecar = json.loads((exported / "idia_export.json").read_text(encoding="utf-8"))
    manifest = demo["manifest"]
    n, n_templates, dim = manifest.num_names, manifest.num_templates, manifest.embedding_dim
    assert sidecar["names"]["rows"] == n * n_templates and sidecar["names"]["shards"] == -(-n * n_templates // 500)
    assert sidecar["names"]["model"]["fingerprint"] == demo["fingerprint"]
    emb, meta = _read_all(exported / "names", "text_emb", ["template_id", "template", "name_id", "name", "prompt",
                                                           "model_fingerprint"])
    assert emb.shape == (n * n_templates, dim)
    # Oracle: the flat index's own stored codes, read with faiss (not through the engine's reader).
    data = demo["index"] / manifest.data_dir
    names = (data / "names.txt").read_text(encoding="utf-8").split("\n")[:-1]
    expected = np.empty_like(emb)
    for t in range(n_templates):
        index = faiss.read_index(str(data / f"template_{t:02d}.faiss"))
        rows = faiss.vector_to_array(index.codes).view(np.float32).reshape(n, dim)
        at = (meta["template_id"].to_numpy() == t)
        expected[at] = rows[meta["name_id"].to_numpy()[at]]
    assert np.array_equal(emb, expected)
    # Every (template, name) once, and each row's metadata says which.
    keys = meta["template_id"].to_numpy() * n + meta["name_id"].to_numpy()
    assert np.array_equal(np.sort(keys), np.arange(n * n_templates))
    for row in meta.sample(50, random_state=0).itertuples():
        assert row.name == names[row.name_id] and row.template == manifest.templates[row.template_id]
        assert row.prompt == manifest.templates[row.template_id].replace("{0}", row.name)
    assert set(meta["model_fingerprint"]) == {demo["fingerprint"]}
    schema_meta = json.loads(pq.read_schema(exported / "names/metadata/metadata_0.parquet").metadata[b"idia_export"])
    assert schema_meta["fingerprint"] == demo["fingerprint"] and schema_meta["embed_dim"] == dim


def test_export_images_equal_the_store_rows(demo, exported):
    emb, meta = _read_all(exported / "images", "img_emb", ["sha256", "image_path", "name", "model_fingerprint"])
    with open(demo["report"] / "predictions" / "images.csv", newline="", encoding="utf-8") as f:
        report_rows = list(csv.DictReader(f))
    assert len(emb) == len(report_rows)
    order = meta["i"].to_numpy()
    assert [(r["sha256"], r["path"], r["name"]) for r in report_rows] == \
        list(zip(meta["sha256"], meta["image_path"], meta["name"]))
    assert np.array_equal(order, np.arange(len(emb)))
    with EmbeddingStore(demo["index"] / "image-store", readonly=True) as store:
        ns = store.recorded_namespace(image_fingerprint_of(demo["fingerprint"], "fp32"))
        stored = store.get_many(ns, [r["sha256"] for r in report_rows])
    assert np.array_equal(emb, stored)


def test_export_float16_rounds_the_rows_and_replaces_only_an_export(demo, exported, tmp_path):
    out = tmp_path / "half"
    for _ in range(2):  # the second run replaces the first export
        result = _cli("export", demo["index"], "-o", out, "--dtype", "float16", "-q")
        assert result.exit_code == 0, result.output
    half = np.load(out / "names/text_emb/text_emb_0.npy")  # one shard of every row: the default 10^6 per file
    full = np.load(exported / "names/text_emb/text_emb_0.npy")
    assert half.dtype == np.float16 and np.array_equal(half[:len(full)], full.astype(np.float16))
    # Without --report the store's every embedding of the model, keyed by content only.
    images = pq.read_table(out / "images/metadata/metadata_0.parquet").to_pydict()
    assert sorted(set(images["sha256"])) == images["sha256"] and set(images["name"]) == {None}
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine", encoding="utf-8")
    result = _cli("export", demo["index"], "-o", stranger, "-q")
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert sorted(p.name for p in stranger.iterdir()) == ["notes.txt"]


def _same_report(a: Path, b: Path, files=REPORT_FILES) -> None:
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_query_on_exported_embeddings_is_the_photo_query(demo, exported, tmp_path):
    out = tmp_path / "report"
    result = _cli("query", "--index-dir", demo["index"], "--embeddings", exported, "--embeddings-model",
                  demo["fingerprint"][:16], "--labels", demo["work"] / "labels.csv", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert "cannot verify" in result.stderr
    _same_report(out, demo["report"])
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["embeddings"]["verified"] is False and "cannot verify" in summary["embeddings"]["note"]
    assert summary["embeddings"]["rows_used"] == summary["counts"]["images_used"]


def test_query_persons_from_image_path_and_rows_scaled_to_unit_norm(demo, exported, tmp_path):
    """No name column: persons from image_path's folder; rows of norm 2 are scaled back; the model by name."""
    folder = tmp_path / "elsewhere"
    shutil.copytree(exported / "images", folder)
    for meta in (folder / "metadata").iterdir():
        table = pq.read_table(meta)
        pq.write_table(table.select(["image_path", "sha256"]), meta)
    for npy in (folder / "img_emb").iterdir():
        np.save(npy, np.load(npy) * np.float32(2.0))
    out = tmp_path / "report"
    result = _cli("query", "--index-dir", demo["index"], "--embeddings", folder, "--embeddings-model", demo["model"],
                  "--labels", demo["work"] / "labels.csv", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["embeddings"]["person_column"] == "image_path"
    assert summary["embeddings"]["rows_normalised"] == summary["counts"]["images_used"] == 720
    _same_report(out, demo["report"], ["persons.csv", "modes.csv", "predictions/topk_ids.npy"])
    scores = np.load(out / "predictions/topk_scores.npy")
    assert np.allclose(scores, np.load(demo["report"] / "predictions/topk_scores.npy"), atol=1e-6)


def test_rows_with_a_persons_sha256_again_are_one_photo(demo, exported, tmp_path):
    """One photo, one vote, as query counts files: the first 5 rows again, under other paths, in a third shard."""
    folder = tmp_path / "with-copies"
    shutil.copytree(exported / "images", folder)
    table = pq.read_table(folder / "metadata/metadata_0.parquet").slice(0, 5)
    copies = [f"copies/{i}.png" for i in range(5)]
    table = table.set_column(table.schema.get_field_index("image_path"), "image_path", pa.array(copies))
    pq.write_table(table, folder / "metadata/metadata_2.parquet")
    np.save(folder / "img_emb/img_emb_2.npy", np.load(folder / "img_emb/img_emb_0.npy")[:5])
    out = tmp_path / "report"
    result = _cli("query", "--index-dir", demo["index"], "--embeddings", folder, "--embeddings-model", demo["model"],
                  "--labels", demo["work"] / "labels.csv", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [d["dropped"] for d in summary["duplicate_photos"]] == copies
    assert summary["embeddings"]["rows_duplicate_photo"] == 5 and summary["counts"]["images_used"] == 720
    _same_report(out, demo["report"], ["persons.csv", "modes.csv", "predictions/topk_ids.npy"])


def _variant(exported: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "variant"
    shutil.copytree(exported / "images", folder)
    change(folder)
    return folder


def _drop_last_row(folder: Path) -> None:
    npy = folder / "img_emb/img_emb_0.npy"
    np.save(npy, np.load(npy)[:-1])


def _narrow(folder: Path) -> None:
    for npy in (folder / "img_emb").iterdir():
        np.save(npy, np.ascontiguousarray(np.load(npy)[:, :32]))


def _truncate(folder: Path) -> None:
    npy = folder / "img_emb/img_emb_1.npy"
    npy.write_bytes(npy.read_bytes()[:-100])


def _other_model(folder: Path) -> None:
    meta = folder / "metadata/metadata_1.parquet"
    table = pq.read_table(meta)
    column = table.schema.get_field_index("model_fingerprint")
    pq.write_table(table.set_column(column, "model_fingerprint", pa.array(["0" * 64] * table.num_rows)), meta)


@pytest.mark.parametrize("case, change, model, pattern", [
    ("no model named", None, None, r"needs --embeddings-model"),
    ("another model", None, "ViT-B-32", r"'ViT-B-32' is not the model of index"),
    ("short fingerprint", None, "fingerprint[:8]", r"is not the model of index"),
    ("another dimension", _narrow, "fingerprint", r"32-dimensional embeddings, index .* 64-dimensional"),
    ("row counts differ", _drop_last_row, "fingerprint", r"img_emb_0.npy holds 499 rows but .*metadata_0.parquet 500"),
    ("metadata shard missing", lambda f: (f / "metadata/metadata_1.parquet").unlink(), "fingerprint",
     r"img_emb_1.npy has no metadata shard .*metadata_1.parquet"),
    ("corrupt npy", _truncate, "fingerprint", r"img_emb_1.npy has \d+ bytes, its header says 220 x 64 .*truncated"),
    ("rows of another model", _other_model, "fingerprint", r"metadata_1.parquet has rows of model fingerprint 000000"),
])
def test_bad_embeddings_are_one_line_and_write_nothing(demo, exported, tmp_path, case, change, model, pattern):
    folder = _variant(exported, tmp_path, change) if change else exported
    model = {"fingerprint": demo["fingerprint"], "fingerprint[:8]": demo["fingerprint"][:8]}.get(model, model)
    out = tmp_path / "report"
    args = ["query", "--index-dir", demo["index"], "--embeddings", folder, "--out", out, "-q"]
    result = _cli(*args, *(["--embeddings-model", model] if model else []))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]


@pytest.mark.parametrize("kind", ["flat", "dense", "IVF2,SQ8", "ensemble"])
def test_every_index_kind_gives_the_rows_its_build_encoded(kind, world, tiny_spec, tiny_model, tmp_path):
    """`export` reads prompts through `NameIndex.stored_rows`: from the flat index, the dense matrix, or the raw
    vectors approximate kinds keep. Oracle: the same prompts encoded by the engine's encoder directly."""
    from idia_engine.engine.index.build import BuildConfig, build_index
    from idia_engine.engine.index.encode import encode_name_prompts

    templates = ("a photo of {0}", "{0} smiling")
    build_index(BuildConfig(names_file=world["names_file"], index_dir=tmp_path / "idx", model=tiny_spec,
                            templates=templates, index_kind=kind), model=tiny_model)
    with open_index(tmp_path / "idx") as index:
        expected = encode_name_prompts(tiny_model, index.templates, index.names)  # [T, N, D]
        stored = np.stack([np.asarray(index.stored_rows(t)) for t in range(len(templates))])
    # Batches may be cut otherwise than in the build, so the encoder is matched within float32 rounding.
    np.testing.assert_allclose(stored, expected, rtol=0, atol=2e-7)
    out = tmp_path / "export"
    result = _cli("export", tmp_path / "idx", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    emb, meta = _read_all(out / "names", "text_emb", ["template_id", "name_id"])
    assert np.array_equal(emb, stored[meta["template_id"].to_numpy(), meta["name_id"].to_numpy()])
    assert json.loads((out / "idia_export.json").read_text(encoding="utf-8"))["images"] is None


@pytest.mark.parametrize("photo_options, pattern", [
    (["--aliases", "aliases.csv"], r"--aliases, --faces-list and --crop read photo files; --embeddings has none"),
    (["--images-per-person", "2"], r"--images-per-person draws photos by their bytes"),
    (["faces"], r"give either a faces folder, --manifest images.csv or --embeddings DIR \(exactly one\)"),
])
def test_embeddings_refuse_options_that_read_photos(demo, exported, tmp_path, photo_options, pattern):
    (tmp_path / "aliases.csv").write_text("alias,name\nA B,C D\n", encoding="utf-8")
    (tmp_path / "faces").mkdir()
    argv = [tmp_path / a if a in ("aliases.csv", "faces") else a for a in photo_options]
    result = _cli("query", *argv, "--index-dir", demo["index"], "--embeddings", exported, "--embeddings-model",
                  demo["model"], "--out", tmp_path / "r")
    assert result.exit_code == 2 and re.search(pattern, result.output), result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
