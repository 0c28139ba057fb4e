"""The report's readable tables: predictions/topk.csv and topk.parquet against the arrays they restate,
persons.csv's `hits` (a form no spreadsheet reads as a number), and persons.csv read back as labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from idia_engine.cli.app import app
from idia_engine.engine.query import report as report_module
from idia_engine.engine.query.labels import read_label_table
from idia_engine.engine.query.report import (
    TOPK_COLUMNS,
    load_predictions,
    write_topk_tables,
)
from typer.testing import CliRunner


def ok(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def reports(tmp_path_factory, world, tiny_model_files):
    """One index, a query with labels, and a second query that takes the first one's persons.csv as labels."""
    root = tmp_path_factory.mktemp("report-tables")
    config, ckpt = tiny_model_files
    ok("build-index", world["names_file"], "--index-dir", root / "idx", "--model", config, "--pretrained", ckpt, "-q")
    labels = root / "labels.csv"
    people = world["people"]
    labels.write_text("name,membership\n" + "".join(f"{p},{'member' if i < 2 else 'non_member'}\n"
                                                   for i, p in enumerate(people[:-1])), encoding="utf-8")
    ok("query", world["faces"], "--index-dir", root / "idx", "--out", root / "r1", "--labels", labels, "-q")
    ok("query", world["faces"], "--index-dir", root / "idx", "--out", root / "r2", "--labels",
       root / "r1" / "persons.csv", "-q")
    return {"r1": root / "r1", "r2": root / "r2", "labels": labels, "people": people}


def read_csv_table(path: Path) -> pd.DataFrame:
    """topk.csv as pandas reads it, with no cell guessed to be NA ("NA" could be a name)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in ("template", "rank"):
        table[column] = table[column].astype(np.int64)
    table["cosine"] = table["cosine"].astype(np.float64)
    table["status"] = pd.array([int(s) if s else None for s in table["status"]], dtype="Int64")
    return table


def expected_rows(report: Path) -> pd.DataFrame:
    """The rows topk.csv must hold, built from topk_ids/topk_scores/top1_status.npy, images.csv, candidates.txt."""
    preds = load_predictions(report)
    status = np.load(report / "predictions" / "top1_status.npy")
    index_dir = Path(json.loads((report / "summary.json").read_text())["parameters"]["index_dir"])
    templates = json.loads((index_dir / "manifest.json").read_text())["templates"]  # verbatim, with {0}
    m, t, k = preds.topk_ids.shape
    image = np.repeat(np.arange(m), t * k)
    template = np.tile(np.repeat(np.arange(t), k), m)
    rank = np.tile(np.arange(1, k + 1), m * t)
    return pd.DataFrame({
        "photo": [preds.images[i]["path"] for i in image], "person": [preds.images[i]["name"] for i in image],
        "template": template, "template_text": [templates[i] for i in template], "rank": rank,
        "name": [preds.candidates[i] for i in np.asarray(preds.topk_ids).reshape(-1)],
        "cosine": np.asarray(preds.topk_scores).reshape(-1),
        "status": pd.array([int(status[i, j]) if r == 1 else None for i, j, r in zip(image, template, rank)],
                           dtype="Int64"),
    })


def test_topk_csv_and_parquet_restate_the_arrays_row_for_row(reports):
    report = reports["r1"]
    expected = expected_rows(report)
    assert len(expected) == 20 * 21 * 10
    from_csv = read_csv_table(report / "predictions" / "topk.csv")
    from_parquet = pd.read_parquet(report / "predictions" / "topk.parquet", dtype_backend="numpy_nullable")
    assert tuple(from_csv.columns) == tuple(from_parquet.columns) == TOPK_COLUMNS
    assert pq.read_schema(report / "predictions" / "topk.parquet").equals(report_module.TOPK_SCHEMA)
    # The CSV's cosines read back as exactly topk_scores' float32 values, not merely close to them.
    assert np.array_equal(from_csv["cosine"].to_numpy().astype(np.float32), expected["cosine"].to_numpy())
    assert np.array_equal(from_parquet["cosine"].to_numpy(np.float32), expected["cosine"].to_numpy())
    parquet_status = from_parquet["status"].astype("Int64")
    for column in ("photo", "person", "template", "template_text", "rank", "name"):
        assert from_csv[column].tolist() == expected[column].tolist() == from_parquet[column].tolist(), column
    assert from_csv["status"].equals(expected["status"]) and parquet_status.equals(expected["status"])
    assert expected["status"].notna().sum() == 20 * 21  # one status per image and template, on rank 1


def test_report_tables_are_byte_identical_for_identical_inputs(reports):
    # The second query differs only in its labels file: the predictions are the same, to the byte.
    for name in ("topk.csv", "topk.parquet"):
        a, b = (reports[r] / "predictions" / name for r in ("r1", "r2"))
        assert a.read_bytes() == b.read_bytes(), name


def test_persons_hits_are_space_separated_digits_that_agree_with_modes(reports):
    report = reports["r1"]
    persons = pd.read_csv(report / "persons.csv")
    # pandas, like a spreadsheet, does not take it for a number
    assert not pd.api.types.is_numeric_dtype(persons["hits"])
    with open(report / "modes.csv", newline="", encoding="utf-8") as f:
        modes = list(csv.DictReader(f))
    for row in persons.itertuples():
        digits = row.hits.split()
        assert row.hits == " ".join(digits) and set(digits) <= {"0", "1"} and len(digits) == 21
        assert digits == [m["hit"] for m in modes if m["name"] == row.name]  # position t = template t
        assert digits.count("1") == row.score


def test_a_persons_csv_serves_as_labels_for_another_run(reports):
    # r1 ran with labels for all but the last person: its persons.csv gives back exactly those labels.
    given = read_label_table(reports["labels"]).members
    table = read_label_table(reports["r1"] / "persons.csv")
    assert table.source_column == "label" and table.members == given and reports["people"][-1] not in given
    summary = json.loads((reports["r2"] / "summary.json").read_text())
    assert summary["metrics"] == json.loads((reports["r1"] / "summary.json").read_text())["metrics"]
    # So r2, labelled by r1's persons.csv, writes the same label column.
    with open(reports["r2"] / "persons.csv", newline="", encoding="utf-8") as f:
        assert {r["name"]: r["label"] for r in csv.DictReader(f)} == \
            {p: ("" if p not in given else "member" if given[p] else "non-member") for p in reports["people"]}


# --- write_topk_tables on its own: chunks, awkward strings, no rows --------------------------------


def _predictions(folder: Path, m: int, t: int, k: int, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    np.save(folder / "topk_ids.npy", rng.integers(0, n, (m, t, k)).astype(np.int32))
    np.save(folder / "topk_scores.npy", -np.sort(-rng.standard_normal((m, t, k)).astype(np.float32), axis=2))
    np.save(folder / "top1_status.npy", rng.integers(0, 6, (m, t)).astype(np.int8))
    return folder


AWKWARD = ["Anna, the first", 'Bob "B" Brown', "NA", "Zoë Ünal", "line\nbreak", "1e3", "  spaced  "]


def test_chunked_writes_are_deterministic_and_equal_one_chunk(tmp_path, monkeypatch):
    m, t, k = 9, 3, 4
    images = [(AWKWARD[i % len(AWKWARD)], f"faces/{AWKWARD[(i + 1) % len(AWKWARD)]}/{i}.png") for i in range(m)]
    args = (images, AWKWARD, ["a photo of {0}", "{0}, a portrait", 'the "{0}"'])
    one = _predictions(tmp_path / "one", m, t, k, len(AWKWARD))
    write_topk_tables(one, *args)
    monkeypatch.setattr(report_module, "TOPK_CHUNK_ROWS", 2 * t * k)  # 2 photos a chunk: 5 chunks
    chunked = [_predictions(tmp_path / name, m, t, k, len(AWKWARD)) for name in ("a", "b")]
    for folder in chunked:
        write_topk_tables(folder, *args)
    for name in ("topk.csv", "topk.parquet"):
        assert (chunked[0] / name).read_bytes() == (chunked[1] / name).read_bytes(), name
    assert pq.ParquetFile(chunked[0] / "topk.parquet").metadata.num_row_groups == 5
    assert (one / "topk.csv").read_bytes() == (chunked[0] / "topk.csv").read_bytes()
    assert pd.read_parquet(one / "topk.parquet").equals(pd.read_parquet(chunked[0] / "topk.parquet"))
    # Commas, quotes, line breaks and "NA" survive the CSV; rows follow the arrays' C order.
    table, parquet = read_csv_table(one / "topk.csv"), pd.read_parquet(one / "topk.parquet")
    image = np.repeat(np.arange(m), t * k)
    names = [AWKWARD[i] for i in np.load(one / "topk_ids.npy").reshape(-1)]
    for frame in (table, parquet):
        assert frame["photo"].tolist() == [images[i][1] for i in image]
        assert frame["person"].tolist() == [images[i][0] for i in image]
        assert frame["name"].tolist() == names


def test_a_report_without_images_has_tables_with_a_header_only(tmp_path):
    folder = _predictions(tmp_path / "p", 0, 21, 10, 5)
    write_topk_tables(folder, [], ["A"] * 5, [f"t{i} {{0}}" for i in range(21)])
    assert (folder / "topk.csv").read_text(encoding="utf-8") == ",".join(TOPK_COLUMNS) + "\n"
    empty = pd.read_parquet(folder / "topk.parquet")
    assert len(empty) == 0 and tuple(empty.columns) == TOPK_COLUMNS
