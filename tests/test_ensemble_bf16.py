"""`--index ensemble-bf16`: where bf16 scans run, and that its exact answers are those of float32 brute force.

Whole queries through this kind give flat's scores and decisions in test_index_build.py (with cells and
without); here: the CPU detection and its override, the choice of resolver by CPU and GPU, the resolver's
exact top-k on structured rows, and one report with and without native bf16.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from idia_engine.benchmarks.synthetic import SyntheticConfig, SyntheticNames
from idia_engine.engine.demo.tiny_model import tiny_names
from idia_engine.engine.index.build import BuildConfig, build_index
from idia_engine.engine.query.report import load_predictions
from idia_engine.engine.query.run import QueryConfig, run_query
from idia_engine.indexes import hardware
from idia_engine.indexes.base import template_file
from idia_engine.indexes.bf16 import BF16ScanBackend
from idia_engine.indexes.ensemble_bf16 import EnsembleBF16Index, bf16_scans_pay
from idia_engine.indexes.exact import exact_topk


@pytest.mark.parametrize("flags, native", [({"avx2", "fma"}, False), ({"avx2", "avx512f", "avx512bw"}, False),
                                           ({"avx512f", "avx512_bf16"}, True), ({"avx2", "amx_bf16"}, True)])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, flags, native):
    """AVX-512 alone is not native bf16 (oneDNN converts in software there); AVX-512 BF16 or AMX is."""
    monkeypatch.delenv(hardware.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    assert hardware.cpu_bf16_native() is native
    monkeypatch.setenv(hardware.OVERRIDE_ENV, "0" if native else "1")  # the override wins either way
    assert hardware.cpu_bf16_native() is not native


def test_bf16_scans_run_on_a_cpu_with_bf16_and_not_on_a_gpu(monkeypatch):
    monkeypatch.setenv(hardware.OVERRIDE_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bf16_scans_pay(use_gpu=False) and bf16_scans_pay(use_gpu=True)  # no GPU: the CPU path, in bf16
    assert EnsembleBF16Index.resolve_in_one_pass(use_gpu=False)
    assert EnsembleBF16Index.resolver_label(use_gpu=False) == "certified bf16 scan"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not bf16_scans_pay(use_gpu=True)  # a GPU: float32 brute force there (no bf16 bound for its arithmetic)
    assert EnsembleBF16Index.resolver_label(use_gpu=True) == "float32 brute force on the GPU"
    monkeypatch.setenv(hardware.OVERRIDE_ENV, "0")
    assert not bf16_scans_pay(use_gpu=False) and not EnsembleBF16Index.resolve_in_one_pass(use_gpu=False)
    assert EnsembleBF16Index.resolver_label(use_gpu=False) == "float32 brute force"


@dataclass
class _Index:
    """The two things a resolver reads of a built index: the float32 rows and the bf16 template file."""

    data_dir: Path
    rows: np.ndarray
    num_templates: int = 1

    def vectors(self, t: int) -> np.ndarray:
        return self.rows

    def load_template(self, t: int, *, use_gpu: bool = False) -> BF16ScanBackend:
        return BF16ScanBackend.load(self.data_dir / template_file(t, BF16ScanBackend.file_suffix))


@pytest.mark.parametrize("native", ["1", "0"])
def test_the_resolver_gives_the_exact_top_k_on_structured_rows(monkeypatch, tmp_path, native):
    """Names sharing first and last names (close rows), queries near their true names or far from every name:
    top-1 and top-10, ids and scores, equal float32 brute force's, whichever path runs."""
    monkeypatch.setenv(hardware.OVERRIDE_ENV, native)
    gen = SyntheticNames(SyntheticConfig(num_names=6000, dim=64, num_templates=1, seed=3, first_pool=60,
                                         last_pool=200))
    rows = gen.template(0)
    q, _, _ = gen.queries(8, 12, member_fraction=0.5)
    EnsembleBF16Index.build_template(0, rows, tmp_path, use_gpu=False, search_params={})
    resolve = EnsembleBF16Index.open_resolver(_Index(tmp_path, rows), 0, use_gpu=False)
    for k in (1, 10):
        scores, ids = resolve(q, k)
        want_s, want_i = exact_topk(rows, q, k)
        assert np.array_equal(ids, want_i) and np.array_equal(scores, want_s)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_one_report_with_and_without_native_bf16(monkeypatch, tiny_model, tiny_spec, world, tmp_path):
    """The same index queried through bf16 scans (one pass) and through float32 brute force (two rounds):
    the same scores, decisions and hits, the same cells, and every top-1 both call exact the same name with
    the same score."""
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(dict.fromkeys(world["people"] + tiny_names(300, seed=3))) + "\n",
                          encoding="utf-8")
    build_index(BuildConfig(names_file=names_file, index_dir=tmp_path / "idx", model=tiny_spec,
                            index_kind="ensemble-bf16"), model=tiny_model)
    assert (tmp_path / "idx").is_dir()
    summaries = {}
    for native in ("1", "0"):
        monkeypatch.setenv(hardware.OVERRIDE_ENV, native)
        summaries[native] = run_query(QueryConfig(index_dir=tmp_path / "idx", faces_dir=world["faces"],
                                                  out_dir=tmp_path / f"r{native}", store_dir=tmp_path / "store"),
                                      model=tiny_model).summary["search"]
    for a, b in zip(_csv_rows(tmp_path / "r1" / "persons.csv"), _csv_rows(tmp_path / "r0" / "persons.csv"),
                    strict=True):  # vote counts of cells with unresolved photos depend on what was resolved
        assert [a[c] for c in ("name", "n_images", "score", "decision", "hits")] == \
               [b[c] for c in ("name", "n_images", "score", "decision", "hits")]
    for a, b in zip(_csv_rows(tmp_path / "r1" / "modes.csv"), _csv_rows(tmp_path / "r0" / "modes.csv"), strict=True):
        assert a["hit"] == b["hit"]
        if a["votes_exact"] == b["votes_exact"] == "1":
            assert a == b
    assert summaries["1"]["cells"]["resolver"] == "certified bf16 scan"
    assert summaries["0"]["cells"]["resolver"] == "float32 brute force"
    a, b = load_predictions(tmp_path / "r1"), load_predictions(tmp_path / "r0")
    both = np.isin(np.load(tmp_path / "r1" / "predictions" / "top1_status.npy"), (0, 1, 2)) & \
        np.isin(np.load(tmp_path / "r0" / "predictions" / "top1_status.npy"), (0, 1, 2))
    assert both.any()
    assert np.array_equal(a.topk_ids[:, :, 0][both], b.topk_ids[:, :, 0][both])
    assert np.array_equal(a.topk_scores[:, :, 0][both], b.topk_scores[:, :, 0][both])


def test_stage_1_loads_the_bf16_means_the_build_saved_or_rounds_them_for_an_older_index(tmp_path):
    """finish_build saves the means' bf16 copy; searchers load it (the same rows and bound maxima as rounding
    the means again), an index built before it gets them rounded on opening, and a copy of another size is
    refused in one line."""
    from idia_engine.indexes.ensemble import ENSEMBLE_DIR, TemplateEnsemble
    from idia_engine.indexes.ensemble_bf16 import MEANS_BF16, _stage1
    from idia_engine.indexes.errors import IndexFileError

    gen = SyntheticNames(SyntheticConfig(num_names=500, dim=32, num_templates=3, seed=5))
    rows = [np.ascontiguousarray(gen.template(t)) for t in range(3)]
    EnsembleBF16Index.finish_build(tmp_path, rows, progress=lambda *a: None)
    folder = tmp_path / ENSEMBLE_DIR
    ensemble = TemplateEnsemble.load(folder)
    saved = _stage1(folder, ensemble)
    assert saved.source == folder / MEANS_BF16
    (folder / MEANS_BF16).unlink()
    made = _stage1(folder, ensemble)
    assert made.source is None
    assert torch.equal(saved._rows().view(torch.int16), made._rows().view(torch.int16))
    assert (saved.max_norm, saved.max_rounding, saved.max_norm_rounded) == \
           (made.max_norm, made.max_rounding, made.max_norm_rounded)
    other = BF16ScanBackend.create(32)
    other.add(rows[0][:400])
    other.save(folder / MEANS_BF16)
    with pytest.raises(IndexFileError, match=r"means.bf16.npz holds 400 x 32 means, the ensemble 500 x 32; rebuild"):
        _stage1(folder, ensemble)
