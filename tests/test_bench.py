"""The benchmark package: the synthetic generator's structure and a `--quick` run of `idia-engine bench`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from idia_engine.benchmarks.synthetic import BLOCK_ROWS, SyntheticConfig, SyntheticNames
from idia_engine.cli.app import app
from idia_engine.engine.errors import InputError
from typer.testing import CliRunner

CFG = SyntheticConfig(num_names=3 * BLOCK_ROWS + 17, dim=64, num_templates=4, seed=5, first_pool=40,
                      last_pool=300)


@pytest.fixture(scope="module")
def gen() -> SyntheticNames:
    return SyntheticNames(CFG)


def test_deterministic_per_seed(gen):
    again = SyntheticNames(CFG)
    np.testing.assert_array_equal(gen.template(2), again.template(2))
    other = SyntheticNames(SyntheticConfig(**{**CFG.to_json(), "seed": 6}))
    assert not np.allclose(gen.template(2), other.template(2))
    q1, _, t1 = gen.queries(5, 4)
    q2, _, t2 = again.queries(5, 4)
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(t1, t2)


def test_random_access_equals_block_generation(gen):
    full = gen.template(1)
    ids = np.array([700, 3, 3 * BLOCK_ROWS + 16, 255, 256, 0], np.int64)
    np.testing.assert_array_equal(gen.rows(1, ids), full[ids])
    np.testing.assert_array_equal(gen.template(1, 100, 600), full[100:600])
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)


def test_threaded_template_equals_row_by_row_generation(monkeypatch):
    from idia_engine.benchmarks import synthetic
    monkeypatch.setattr(synthetic, "THREAD_CHUNK_ROWS", 100)  # 8 chunks, the last one short
    fresh = SyntheticNames(CFG)
    for t in (0, 3, 0):  # the second call of a template reuses the cached template-free part
        threaded = fresh.template(t, threads=3)
        np.testing.assert_array_equal(threaded, fresh.rows(t, np.arange(CFG.num_names)))
    np.testing.assert_array_equal(fresh.template(2, 50, 420, threads=4), fresh.rows(2, slice(50, 420)))


def test_queries_sit_at_clip_like_cosine(gen):
    q, person, true = gen.queries(20, 6)
    assert q.shape == (120, CFG.dim) and np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    cos = np.stack([(q * gen.rows(t, true[person])).sum(1) for t in range(CFG.num_templates)])
    assert 0.18 < cos.mean() < 0.37 and cos.min() > 0.1 and cos.max() < 0.45


def test_names_sharing_a_first_name_are_closer(gen):
    x = gen.template(0).astype(np.float64)
    s = x @ x.T
    same_first = gen.first_ids[:, None] == gen.first_ids[None, :]
    same_last = gen.last_ids[:, None] == gen.last_ids[None, :]
    off = ~np.eye(len(x), dtype=bool)
    unrelated = off & ~same_first & ~same_last
    assert s[off & same_first & ~same_last].mean() > s[unrelated].mean() + 0.1
    assert s[off & same_last & ~same_first].mean() > s[unrelated].mean() + 0.1
    # a name's templates are closer to each other than to any other name, on average
    same_name = (x * gen.template(3)).sum(1).mean()
    assert same_name > np.where(off, s, -1).max(1).mean()


def test_quick_bench_cli_writes_every_artifact(tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "--quick", "--out", str(out), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    assert str(out) in res.output.replace("\n", "")
    data = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert md.startswith("Member fraction 1.0;") and data["machine"]["cpu_features"] in md and "\n| names |" in md
    assert (out / "throughput.png").stat().st_size > 1000
    assert data["machine"]["cores"] and data["versions"]
    (size,) = data["sizes"]
    assert {"dense", "flat", "ensemble", "ensemble-exact", "ensemble-bf16"} <= set(size["methods"])
    assert "flat-gpu" in size["skipped"] or "flat-gpu" in size["methods"]
    for m, r in size["methods"].items():
        for key in ("qps", "ratio_to_dense", "top1_agreement", "recall_at_1", "decision_agreement",
                    "score_agreement", "build_s", "index_bytes"):
            assert r[key] is not None, (m, key)
    assert size["methods"]["flat"]["decision_agreement"] == 1.0
    assert size["methods"]["ensemble-exact"]["top1_agreement"] == 1.0
    from idia_engine.indexes.ensemble_bf16 import bf16_scans_pay

    assert size["methods"]["ensemble-bf16"]["bf16_scans"] == bf16_scans_pay(use_gpu=False)  # as the index would
    cells = size["methods"]["cells"]
    assert cells["decision_agreement"] == cells["score_agreement"] == 1.0
    assert cells["top1_agreement_where_exact"] in (None, 1.0)
    assert 0.0 <= cells["cells_settled_by_witnesses"] <= 1.0


def test_member_fraction_sets_who_the_model_knows(tmp_path):
    from idia_engine.benchmarks.run import QUICK, BenchConfig, run_bench

    base = {**QUICK, "methods": ("flat", "cells"), "sizes": (2000,), "persons": 10, "persons_large": 10,
            "images_per_person": 5}
    shares = {}
    for f in (0.0, 1.0):
        size = run_bench(BenchConfig(**base, member_fraction=f, out=tmp_path / str(f)))["sizes"][0]
        shares[f] = (size["exact_top1_true_fraction"], size["methods"]["cells"]["cells_settled_by_witnesses"])
        assert size["methods"]["cells"]["decision_agreement"] == 1.0
    # non-members' photos rarely name them, and witnesses settle their cells; members' need brute force
    assert shares[0.0][0] < shares[1.0][0] and shares[0.0][1] > shares[1.0][1]
    with pytest.raises(InputError, match="--member-fraction"):
        BenchConfig(member_fraction=1.5)


def test_bad_options_are_one_line_errors(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--quick", "--methods", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "unknown method" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["bench", "--quick", "--size", "3", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--size" in res.output


def test_precision_benchmark_reports_every_precision_beside_float32():
    from idia_engine.benchmarks.precision import measure

    result = measure(queries=8, names=256, dim=32, repeat=1)
    assert set(result["results"]) == {"float32", "float16", "bfloat16", "int8 (torch._int_mm)"}
    assert result["results"]["float32"]["x_float32_speed"] == 1.0
    assert result["machine"]["cpu_features"]


def test_search_memory_builds_then_searches_a_built_index(tmp_path, monkeypatch):
    """benchmarks/search_memory: the real build, then query's search and cells over the built index; the
    report has both phases' peak RSS and exact decisions (no answer kept uncertified)."""
    import sys

    from idia_engine.benchmarks import search_memory

    monkeypatch.setattr(sys, "argv", ["search_memory", "--names", "400", "--templates", "2", "--dim", "32",
                                      "--persons", "4", "--photos", "5", "--out", str(tmp_path), "--check",
                                      "--float32-baseline"])
    search_memory.main()
    result = json.loads((tmp_path / "search_memory.json").read_text())
    assert (result["names"], result["templates"], result["photos"]) == (400, 2, 20)
    assert result["index_kind"] == "ensemble-bf16"
    assert result["search_peak_rss_gib"] > 0 and result["build_peak_rss_gib"] > 0
    assert result["search"]["uncertified_kept"] == 0 and result["search"]["exact_decisions"]
    assert result["search"]["cells"]["cells"] == 4 * 2
    assert result["float32_vectors_files"] == 0  # the float32 rows are the bf16 rows plus their low halves
    check = result["check"]
    assert check["exact_top1s"] > 0 and check["exact_top1s_equal"]
    assert check["decisions_equal"] and check["scores_equal"] and check["modes_equal"]
    baseline = result["float32_baseline"]  # the same answers with float32 vectors files, which are gone again
    assert baseline["answers_identical"] and baseline["search_s_float32_files"] > 0
    assert not list((tmp_path / "index").glob("data-*/vectors_??.npy"))
