"""GPU paths: on a CUDA machine they must agree with the CPU; without one they fall back cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from idia_engine.cli.app import app
from idia_engine.engine.query.report import load_predictions
from typer.testing import CliRunner

runner = CliRunner()
has_cuda = torch.cuda.is_available()


def _run(*args) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def _build_and_query(tmp_path, world, tiny_model_files, device: str, tag: str):
    config, ckpt = tiny_model_files
    idx, report = tmp_path / f"idx-{tag}", tmp_path / f"report-{tag}"
    _run("build-index", world["names_file"], "--index-dir", idx, "--model", config, "--pretrained", ckpt,
         "--device", device, "-q")
    _run("query", world["faces"], "--index-dir", idx, "--out", report, "--device", device, "-q")
    return idx, report


@pytest.mark.skipif(has_cuda, reason="checks the fallback of a machine without a GPU")
def test_auto_device_without_gpu_runs_everything_on_the_cpu(tmp_path, world, tiny_model_files):
    idx, report = _build_and_query(tmp_path, world, tiny_model_files, "auto", "auto")
    assert json.loads((idx / "manifest.json").read_text())["encode"]["device"] == "cpu"
    assert json.loads((report / "summary.json").read_text())["parameters"]["device"] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="torch sees no CUDA GPU")
def test_cuda_pipeline_agrees_with_cpu(tmp_path, world, tiny_model_files):
    _, cpu = _build_and_query(tmp_path, world, tiny_model_files, "cpu", "cpu")
    idx, gpu = _build_and_query(tmp_path, world, tiny_model_files, "cuda", "cuda")
    assert json.loads((idx / "manifest.json").read_text())["encode"]["device"].startswith("cuda")
    a, b = load_predictions(cpu), load_predictions(gpu)
    np.testing.assert_allclose(a.topk_scores, b.topk_scores, atol=1e-4)
    agreement = (a.topk_ids[:, :, 0] == b.topk_ids[:, :, 0]).mean()
    assert agreement >= 0.99, agreement
    if agreement == 1.0:
        assert (cpu / "persons.csv").read_text() == (gpu / "persons.csv").read_text()


def _rows_and_queries():
    rng = np.random.default_rng(11)
    rows = rng.standard_normal((5000, 64)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[17] = rows[3]  # an exact tie: the lower id wins on every device
    q = rows[[3, 40, 41]] + 0.05 * rng.standard_normal((3, 64)).astype(np.float32)
    return rows, np.vstack([q, rng.standard_normal((9, 64)).astype(np.float32)])


@pytest.mark.skipif(has_cuda, reason="checks the fallback of a machine without a GPU")
def test_gpu_brute_force_without_gpu_falls_back_to_the_cpu(caplog):
    from idia_engine.indexes.exact import exact_topk

    rows, q = _rows_and_queries()
    with caplog.at_level("WARNING"):
        a = exact_topk(rows, q, 4, chunk_rows=1500, use_gpu=True)
    assert "no CUDA GPU" in caplog.text
    b = exact_topk(rows, q, 4, chunk_rows=1500)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="torch sees no CUDA GPU")
def test_gpu_brute_force_equals_the_cpu_even_with_tf32_asked_for():
    from idia_engine.indexes.exact import exact_topk

    rows, q = _rows_and_queries()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # would allow TF32; the brute force holds it off
    try:
        a = exact_topk(rows, q, 4, chunk_rows=1500, use_gpu=True)
    finally:
        torch.set_float32_matmul_precision(before)
    b = exact_topk(rows, q, 4, chunk_rows=1500)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
