"""`labels`: names counted in captions, against a plain-regex oracle on captions full of traps, locally, split
over processes, resumed, and on a local Ray with 2 workers: identical counts everywhere."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from idia_engine.cli.app import app
from idia_engine.engine.errors import IdiaError, InputError
from idia_engine.engine.ground_truth import workers
from idia_engine.engine.ground_truth.captions import CaptionFile, Piece, iter_batches, pieces_of
from idia_engine.engine.ground_truth.matcher import NameMatcher, nested_names
from idia_engine.engine.ground_truth.run import CaptionLabelsConfig, count_caption_labels
from idia_engine.engine.query.labels import read_label_table
from typer.testing import CliRunner

NAMES = ["Ann Lee", "Ann Leeds", "Mary Ann Lee", "José Álvarez", "Bo Li", "Li Wei", "Zoë Saldana", "Mark Twain",
         "Nobody Here"]
TRAPS = [
    "Ann Lee at the premiere", "photo of ann lee", "ANN LEE!", "(Ann Lee)", "Ann Lee's new film", "Ann  Lee\tagain",
    "Ann Leeds in town", "Mary Ann Lee smiling", "Joann Lee", "Ann Leex", "xAnn Lee", "Ann_Lee", "Ann Lee2",
    "Jose\u0301 A\u0301lvarez on stage", "José Álvarez", "jOSÉ álvarez", "Bo Li and Li Wei", "Bo Lin", "Bo Li",
    "Zoë Saldana, Mark Twain and Ann Lee", "Ann Lee Ann Lee Ann Lee", "", "   ", "Mark Twain", "Mark\u00a0Twain",
]


def oracle(names: list[str], captions: list[str | None], case_sensitive: bool = False) -> dict[str, int]:
    """Captions containing each name as whole words, by plain regex over the same normalisation."""
    def norm(text: str) -> str:
        text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()
        return text if case_sensitive else text.casefold()
    normed = [norm(c) for c in captions if c]
    return {n: sum(1 for c in normed if re.search(r"(?<!\w)" + re.escape(norm(n)) + r"(?!\w)", c)) for n in names}


def generated_captions(n: int, seed: int) -> list[str | None]:
    rng = np.random.default_rng(seed)
    fillers = ["a photo of", "portrait,", "with", "at the", "red carpet", "and friends", "Lee", "Ann", "Leeds"]
    out: list[str | None] = []
    for _ in range(n):
        parts = [fillers[i] for i in rng.integers(0, len(fillers), rng.integers(0, 6))]
        if rng.random() < 0.6:
            parts.insert(int(rng.integers(0, len(parts) + 1)), NAMES[int(rng.integers(0, len(NAMES) - 1))])
        if rng.random() < 0.1:
            out.append(None)
            continue
        out.append(" ".join(parts) if rng.random() < 0.9 else str(rng.choice(TRAPS)))
    return out


def write_inputs(root: Path, captions: list[str | None]) -> list[Path]:
    """The captions spread over a Parquet file (3 row groups), a binary-column Parquet file with a bad byte,
    a text file with a bad byte and a headerless TSV (CC3M's layout)."""
    root.mkdir(parents=True, exist_ok=True)
    q = len(captions) // 4
    a, b, c, d = captions[:q], captions[q:2 * q], captions[2 * q:3 * q], captions[3 * q:]
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(len(a))], "caption": a}), root / "a.parquet",
                   row_group_size=max(1, len(a) // 3))
    raw = [None if x is None else x.encode() for x in b] + [b"Ann Lee \xff broken"]
    pq.write_table(pa.table({"TEXT": pa.array(raw, pa.binary())}), root / "b.parquet")
    (root / "c.txt").write_bytes(b"\n".join((x or "").encode() for x in c) + b"\nMark Twain \xfe\n")
    (root / "d.tsv").write_bytes(b"".join(((x or "").replace("\t", " ") + "\thttp://x\n").encode() for x in d))
    return [root / "a.parquet", root / "b.parquet", root / "c.txt", root / "d.tsv"]


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, list[Path], dict[str, int]]:
    captions = generated_captions(1500, seed=0) + TRAPS
    files = write_inputs(tmp_path / "captions", captions)
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(NAMES) + "\n", encoding="utf-8")
    expected = oracle(NAMES, captions + ["Ann Lee \ufffd broken", "Mark Twain \ufffd"])
    return names_file, files, expected


def test_the_matcher_agrees_with_the_oracle_on_every_trap():
    matcher = NameMatcher(NAMES)
    counts = np.zeros(len(NAMES), np.int64)
    matcher.count(TRAPS, counts)
    assert dict(zip(NAMES, counts.tolist())) == oracle(NAMES, TRAPS)
    # by hand: premiere, ann lee, ANN LEE!, (Ann Lee), Lee's, double space/tab, Mary Ann Lee, "and Ann Lee", the
    # thrice-repeated one (once); not Leeds, Joann, Leex, xAnn, Ann_Lee, Lee2
    assert oracle(NAMES, TRAPS)["Ann Lee"] == 9
    sensitive = NameMatcher(NAMES, case_sensitive=True)
    counts = np.zeros(len(NAMES), np.int64)
    sensitive.count(TRAPS, counts)
    assert dict(zip(NAMES, counts.tolist())) == oracle(NAMES, TRAPS, case_sensitive=True)
    assert ("Ann Lee", "Mary Ann Lee") in nested_names(NAMES) and ("Bo Li", "Li Wei") not in nested_names(NAMES)


def test_counts_equal_the_oracle_whatever_the_split(inputs, tmp_path, monkeypatch):
    names_file, files, expected = inputs
    one = count_caption_labels(CaptionLabelsConfig(inputs=tuple(files), names_file=names_file,
                                                   out=tmp_path / "one.csv", workers=1))
    assert one.counts == expected
    monkeypatch.setattr("idia_engine.engine.ground_truth.captions.ROWS_PER_PIECE", 100)  # a.parquet: 3 pieces
    two = count_caption_labels(CaptionLabelsConfig(inputs=(files[0].parent,), names_file=names_file,
                                                   out=tmp_path / "two.csv", workers=2))
    assert two.counts == expected
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()
    m = two.manifest
    by_kind = {Path(i["path"]).name: i for i in m["inputs"]}
    assert by_kind["b.parquet"]["invalid_utf8_rows"] == 1 and by_kind["c.txt"]["invalid_utf8_rows"] == 1
    assert by_kind["d.tsv"]["column"] == "0 (no header)" and by_kind["b.parquet"]["column"] == "TEXT"
    assert m["rows_read"] == sum(i["rows"] for i in m["inputs"]) and len(by_kind["a.parquet"]["sha256"]) == 64
    labels = read_label_table(tmp_path / "two.csv")  # query --labels and evaluate read it as it is
    assert labels.members["Ann Lee"] and not labels.members["Nobody Here"]
    assert labels.occurrences["Ann Lee"] == expected["Ann Lee"]
    assert not (tmp_path / ".two.csv.parts").exists()


def test_an_interrupted_run_resumes_per_file(inputs, tmp_path, monkeypatch):
    names_file, files, expected = inputs
    config = CaptionLabelsConfig(inputs=tuple(files), names_file=names_file, out=tmp_path / "l.csv", workers=1)
    real = workers.count_piece
    calls = []

    def interrupted(piece, matcher, batch_rows):
        calls.append(piece.file.path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(piece, matcher, batch_rows)
    monkeypatch.setattr(workers, "count_piece", interrupted)
    with pytest.raises(KeyboardInterrupt):
        count_caption_labels(config)
    assert not (tmp_path / "l.csv").exists() and len(list((tmp_path / ".l.csv.parts").iterdir())) == 2
    monkeypatch.setattr(workers, "count_piece", real)
    result = count_caption_labels(config)
    assert result.counts == expected
    assert [i["reused_from_earlier_run"] for i in result.manifest["inputs"]] == [True, True, False, False]


def test_pieces_cover_every_row_group_once(tmp_path, monkeypatch):
    pq.write_table(pa.table({"caption": [f"c{i}" for i in range(50)]}), tmp_path / "x.parquet", row_group_size=7)
    monkeypatch.setattr("idia_engine.engine.ground_truth.captions.ROWS_PER_PIECE", 10)
    file = CaptionFile(tmp_path / "x.parquet", "parquet", "caption")
    pieces = pieces_of(file)
    rows = [c for p in pieces for batch, _ in iter_batches(p) for c in batch]
    assert rows == [f"c{i}" for i in range(50)] and len(pieces) == 4
    assert [c for batch, _ in iter_batches(Piece(file, None)) for c in batch] == rows


@pytest.mark.slow
def test_a_local_ray_with_two_workers_gives_the_same_counts(inputs, tmp_path):
    names_file, files, expected = inputs
    result = count_caption_labels(CaptionLabelsConfig(inputs=tuple(files), names_file=names_file,
                                                      out=tmp_path / "ray.csv", workers=2, ray="local"))
    assert result.counts == expected and result.manifest["backend"]["kind"] == "ray"


def test_bad_inputs_are_one_line_and_leave_nothing(inputs, tmp_path):
    names_file, files, _ = inputs
    pq.write_table(pa.table({"url": ["x"]}), tmp_path / "nocaption.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    (tmp_path / "notes.json").write_text("{}")
    cases = [
        ((tmp_path / "nocaption.parquet",), {}, r"has no column any of caption, TEXT, text \(it has url\).*--column"),
        ((files[0],), {"column": "title"}, r"has no column 'title' \(it has url, caption\)"),
        ((tmp_path / "corrupt.parquet",), {}, r"corrupt\.parquet is not a readable Parquet file"),
        ((tmp_path / "notes.json",), {}, r"unknown kind '\.json'"),
        ((tmp_path / "missing.txt",), {}, r"missing\.txt does not exist"),
        ((files[0], files[0].parent), {}, r"given twice"),
        ((files[0],), {"ray": "127.0.0.1:1"}, r"cannot reach a Ray cluster at 127\.0\.0\.1:1"),
        ((files[0],), {"ray": "nonsense"}, r"is not host:port"),
        ((files[0],), {"min_occurrences": 0}, r"--min-occurrences must be >= 1"),
    ]
    for inputs_, extra, pattern in cases:
        with pytest.raises(IdiaError, match=pattern) as e:
            count_caption_labels(CaptionLabelsConfig(inputs=inputs_, names_file=names_file, out=tmp_path / "o.csv",
                                                     workers=1, **extra))
        assert "\n" not in str(e.value)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("o.", ".o."))) == []
    with pytest.raises(InputError, match="is a directory"):
        CaptionLabelsConfig(inputs=(files[0],), names_file=names_file, out=tmp_path)


def test_the_cli(inputs, tmp_path):
    names_file, files, expected = inputs
    r = CliRunner().invoke(app, ["labels", *map(str, files), "--names", str(names_file), "-o",
                                 str(tmp_path / "l.csv"), "--workers", "1", "-q"])
    assert r.exit_code == 0, r.output
    assert "members" in r.output and "inside longer names" in r.output
    manifest = json.loads((tmp_path / "l.manifest.json").read_text())
    assert manifest["artifact"] == "idia-engine caption labels" and manifest["matcher"]["case_sensitive"] is False
    r = CliRunner().invoke(app, ["labels", str(tmp_path / "nope.parquet"), "--names", str(names_file), "-q"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
