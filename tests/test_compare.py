"""`compare`: reports of two models over the same people, written by hand so every number is known.

The world: 24 people with 3 photos each, T = 3 templates, candidates = the people plus two made-up names.
The baseline model ("before") gets every template right for the first 12 (members) and nothing for the
other 12; the second model ("after", e.g. after unlearning) forgets members 0..9 by different amounts
(they lose 1, 2 or 3 templates) and gains one template for non-member 12.
"""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from idia_engine.cli.app import app
from idia_engine.engine.compare.paired import mcnemar_exact, wilcoxon_signed_rank
from idia_engine.engine.compare.run import CompareConfig, compare_reports
from idia_engine.engine.errors import IdiaError, InputError
from idia_engine.engine.query.report import REPORT_ARTIFACT, REPORT_SCHEMA_VERSION, write_images_csv, write_summary
from scipy import stats
from typer.testing import CliRunner

PEOPLE = [f"Person {i:02d}" for i in range(24)]
CANDIDATES = PEOPLE + ["Fake One", "Fake Two"]
FAKE = len(PEOPLE)
T = 3
LOST = {i: 1 + i % 3 for i in range(10)}  # templates member i loses under "after"


def top1s(model: str) -> dict[str, list[list[int]]]:
    """person -> per photo, per template the top-1 id."""
    out = {}
    for i, person in enumerate(PEOPLE):
        right = T if i < 12 else 0
        if model == "after":
            right -= LOST.get(i, 0)
            right += 1 if i == 12 else 0
        out[person] = [[i if t < right else FAKE for t in range(T)] for _ in range(3)]
    return out


def write_report(root: Path, predictions: dict[str, list[list[int]]], *, candidates=CANDIDATES, tau: int = 1,
                 labels: Path | None = None, photo_tag: str = "") -> Path:
    pred = root / "predictions"
    pred.mkdir(parents=True)
    rows, top1 = [], []
    for person, photos in predictions.items():
        for j, ids in enumerate(photos):
            rows.append((person, f"/faces/{person}/{j}.jpg", f"sha-{person}-{j}{photo_tag if j == 0 else ''}"))
            top1.append(ids)
    top1 = np.array(top1, np.int32)
    np.save(pred / "topk_ids.npy", np.stack([top1, (top1 + 1) % len(candidates)], axis=2))
    np.save(pred / "topk_scores.npy", np.stack([np.full(top1.shape, 0.9), np.full(top1.shape, 0.5)], 2)
            .astype(np.float32))
    write_images_csv(pred / "images.csv", rows)
    (pred / "candidates.txt").write_text("".join(c + "\n" for c in candidates), encoding="utf-8")
    write_summary(root, {
        "schema_version": REPORT_SCHEMA_VERSION, "artifact": REPORT_ARTIFACT, "mode": "paper",
        "parameters": {"labels_file": str(labels) if labels else None, "tau": tau, "top_k": 2},
        "index": {"index_kind": "flat"},
        "model": {"model": "tiny", "pretrained": str(root), "weights_source": "local", "fingerprint": "ab" * 32},
        "persons_without_images": [],
    })
    return root


@pytest.fixture
def two(tmp_path) -> tuple[Path, Path, Path]:
    labels = tmp_path / "labels.csv"
    labels.write_text("name,member\n" + "".join(f"{p},{int(i < 12)}\n" for i, p in enumerate(PEOPLE)),
                      encoding="utf-8")
    return (write_report(tmp_path / "before", top1s("before"), labels=labels),
            write_report(tmp_path / "after", top1s("after"), labels=labels), labels)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_per_person_changes_flips_and_paired_tests(two, tmp_path):
    before, after, labels = two
    result = compare_reports([before, after], CompareConfig(out_dir=tmp_path / "cmp", bootstrap_resamples=200))
    c = result.comparison
    assert c["labels"]["source"] == "recorded by every report" and c["alignment"]["persons"] == 24
    rows = {r["name"]: r for r in read_csv(tmp_path / "cmp" / "persons.csv")}
    for i, p in enumerate(PEOPLE):
        expected_before = T if i < 12 else 0
        expected_after = expected_before - LOST.get(i, 0) + (1 if i == 12 else 0)
        assert rows[p]["score_before"] == str(expected_before) and rows[p]["score_after"] == str(expected_after)
        assert rows[p]["change_after"] == str(expected_after - expected_before)
    # members whose 3 templates all go (i % 3 == 2: 2, 5, 8) flip; non-member 12 flips the other way
    flipped = {p: r["flipped_after"] for p, r in rows.items() if r["flipped_after"]}
    assert flipped == {"Person 02": "member -> non-member", "Person 05": "member -> non-member",
                       "Person 08": "member -> non-member", "Person 12": "non-member -> member"}
    pair = c["pairs"][0]
    assert pair["decisions"]["member_to_non_member"] == 3 and pair["decisions"]["non_member_to_member"] == 1
    assert pair["decisions"]["p_value"] == pytest.approx(stats.binomtest(3, 4, 0.5).pvalue)
    paper = pair["scores"]["paper"]
    diffs = [-LOST[i] for i in range(10)] + [1]
    assert (paper["nonzero"], paper["fell"], paper["rose"]) == (11, 10, 1)
    assert paper["method"] == "asymptotic"  # tied magnitudes
    assert paper["p_value"] == pytest.approx(stats.wilcoxon(diffs, method="asymptotic").pvalue)
    members = pair["groups"]["members"]["scores"]["paper"]
    assert members["fell"] == 10 and members["mean_change"] == pytest.approx(-sum(LOST.values()) / 12)
    models = c["models"]
    assert models["before"]["rates"]["TPR"]["value"] == 1 and models["after"]["rates"]["TPR"]["value"] == 9 / 12
    assert models["after"]["rates"]["FPR"]["k"] == 1 and models["after"]["rates"]["FPR"]["low"] > 0
    assert models["before"]["AUC"]["paper"]["value"] == 1
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["artifact"] == "idia-engine comparison"
    assert sorted(p.name for p in result.files) == sorted(["comparison.json", "persons.csv", "score_scatter.png",
                                                            "score_change.png", "comparison.html"])


class _Tables(HTMLParser):
    """The text of every table cell, per table, and the images."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._cell = [], 0, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img" and dict(attrs)["src"].startswith("data:image/png;base64,"):
            self.images += 1

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None


def test_the_page_shows_the_models_tests_and_flips(two, tmp_path):
    before, after, _ = two
    compare_reports([before, after], CompareConfig(out_dir=tmp_path / "cmp", bootstrap_resamples=200))
    page = _Tables()
    page.feed((tmp_path / "cmp" / "comparison.html").read_text(encoding="utf-8"))
    models, tests, flips = page.tables
    assert [row[0] for row in models[1:]] == ["before", "after"] and models[0][3] == "fingerprint"
    assert models[2][models[0].index("TPR [95 % CP]")].startswith("0.750 [")
    assert tests[1][0] == "after vs before: everyone" and tests[1][2:4] == ["3", "1"]
    assert {row[0] for row in flips[1:]} == {"Person 02", "Person 05", "Person 08", "Person 12"}
    assert page.images == 2


def test_paired_tests_against_scipy_and_by_hand():
    before = np.array([True] * 12 + [False] * 3)
    after = before.copy()
    after[:12] = False
    assert mcnemar_exact(before, after)["p_value"] == pytest.approx(2 * 0.5 ** 12)
    assert mcnemar_exact(before, before)["p_value"] == 1.0
    drop = np.arange(1, 13, dtype=float)  # distinct magnitudes, <= 50: exact
    w = wilcoxon_signed_rank(drop, np.zeros(12))
    assert w["method"] == "exact" and w["p_value"] == pytest.approx(2 * 0.5 ** 12) and w["fell"] == 12
    same = wilcoxon_signed_rank(np.ones(5), np.ones(5))
    assert same["p_value"] is None and "zero" in same["note"]


def test_overlap_compares_what_the_reports_share(two, tmp_path):
    before, _, labels = two
    fewer = {p: v for p, v in top1s("after").items() if p != "Person 23"}
    after = write_report(tmp_path / "after-fewer", fewer, labels=labels)
    with pytest.raises(InputError, match=r"differ in their persons with photos: 1 only in the first "
                                         r"\(e\.g\. 'Person 23'\).*--overlap"):
        compare_reports([before, after], CompareConfig(out_dir=tmp_path / "cmp"))
    c = compare_reports([before, after], CompareConfig(out_dir=tmp_path / "cmp", overlap=True,
                                                       bootstrap_resamples=200)).comparison
    assert c["alignment"]["persons"] == 23 and c["alignment"]["dropped"]["before"] == {"persons": 1, "photos": 3}
    assert any("not shared by every report" in note for note in c["notes"])


def test_bad_inputs_are_one_line_each(two, tmp_path):
    before, after, labels = two
    out = CompareConfig(out_dir=tmp_path / "cmp")
    other_photo = write_report(tmp_path / "other-photo", top1s("after"), photo_tag="-x", labels=labels)
    other_candidates = write_report(tmp_path / "other-cands", top1s("after"), candidates=CANDIDATES[:-1] + ["Fake 3"])
    other_tau = write_report(tmp_path / "other-tau", top1s("after"), tau=2)
    cases = [
        ([before], r"at least two reports, got 1"),
        ([before, before], r"is given twice"),
        ([before, tmp_path / "nowhere"], r"nowhere is not a directory"),
        ([before, other_photo], r"differ in the photos of 24 person\(s\) \(e\.g\. 'Person 00'\).*SHA-256"),
        ([before, other_candidates], r"differ in their candidate names: 1 only in the first \(e\.g\. 'Fake Two'\)"),
        ([before, other_tau], r"different tau \(before: 1, other-tau: 2\); pass --tau"),
    ]
    for dirs, pattern in cases:
        with pytest.raises(IdiaError, match=pattern) as e:
            compare_reports(dirs, out)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="would replace the report"):
        compare_reports([before, after], CompareConfig(out_dir=before))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(IdiaError, match="not empty and holds no earlier comparison"):
        compare_reports([before, after], CompareConfig(out_dir=tmp_path / "busy"))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_the_cli_is_a_thin_adapter(two, tmp_path):
    before, after, _ = two
    runner = CliRunner()
    r = runner.invoke(app, ["compare", str(before), str(after), "--out", str(tmp_path / "cmp"), "-q"])
    assert r.exit_code == 0, r.output
    assert "after vs before" in r.output and (tmp_path / "cmp" / "comparison.html").is_file()
    r = runner.invoke(app, ["compare", str(before), "--out", str(tmp_path / "cmp2"), "-q"])
    assert r.exit_code == 2 and "at least two reports" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_users_file_in_an_earlier_comparison_is_never_deleted(two, tmp_path):
    before, after, _ = two
    config = CompareConfig(out_dir=tmp_path / "cmp", bootstrap_resamples=200)
    compare_reports([before, after], config)
    compare_reports([before, after], config)  # an earlier comparison, as written, is replaced
    (tmp_path / "cmp" / "my-notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(InputError, match=r"holds my-notes\.txt, which no comparison writes"):
        compare_reports([before, after], config)
    assert (tmp_path / "cmp" / "my-notes.txt").read_text(encoding="utf-8") == "mine"
