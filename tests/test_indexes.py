"""Name-index backends and index kinds against an exact float64 numpy oracle, on structured synthetic embeddings.

Every registered per-template backend is tested (parametrised over the registry, so a new backend is picked
up automatically), and every kind is built into a directory and searched the way the engine does. The data mimics the attack: candidate names share first and last names, and image
embeddings sit at cosine 0.3 from their true name, offset along one shared direction (a modality gap).

Tolerances: scores within SCORE_TOL of the float64 oracle; a top-k set is compared only where the oracle's
k-th and (k+1)-th scores differ by more than SCORE_TOL (below that, float32 may legitimately swap them).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
import pytest
import torch
from idia_engine.engine.errors import IdiaError, InputError
from idia_engine.indexes import (
    DEFAULT_CANDIDATES,
    EnsembleIndex,
    IndexKind,
    TemplateEnsemble,
    as_vectors,
    backend_kinds,
    get_backend,
    sort_topk,
    template_file,
    vectors_file,
)
from idia_engine.indexes.base import (
    NameIndexBackend,
    UnknownBackendError,
    VectorFormatError,
)
from idia_engine.indexes.bounds import gamma
from idia_engine.indexes.gpu import faiss_gpu_count
from idia_engine.indexes.split_rows import low_file

SCORE_TOL = 1e-5
DIM = 64


# Kinds whose own top-k is approximate by design (only search_exact makes it exact), with their own tests.
APPROXIMATE_BY_DESIGN = {"bf16": "tests/test_bf16_index.py"}


def backends() -> list[str]:
    """Every registered per-template kind whose own search answers exactly: a newly registered backend is
    tested without touching this file."""
    return [k for k in backend_kinds() if issubclass(get_backend(k), NameIndexBackend)
            and k not in APPROXIMATE_BY_DESIGN]


# --- structured synthetic data and the oracle -----------------------------------------------------------


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def make_names(n: int, rng: np.random.Generator, dim: int = DIM, n_first: int = 12, n_last: int = 16
               ) -> np.ndarray:
    """float32 [n, dim], unit rows: normalise(first-name vector + last-name vector + small individual part)."""
    first = _unit(rng.standard_normal((n_first, dim)))
    last = _unit(rng.standard_normal((n_last, dim)))
    own = _unit(rng.standard_normal((n, dim)))
    fi = rng.integers(n_first, size=n)
    li = rng.integers(n_last, size=n)
    return _unit(first[fi] + last[li] + 0.5 * own).astype(np.float32)


def make_images(names: np.ndarray, n: int, rng: np.random.Generator, cos: float = 0.3) -> np.ndarray:
    """float32 [n, dim], unit rows at cosine `cos` from a random true name; the rest of each vector points
    mostly along one shared modality-gap direction (plus per-image noise), orthogonal to that name."""
    dim = names.shape[1]
    gap = _unit(rng.standard_normal(dim))
    true = names[rng.integers(len(names), size=n)].astype(np.float64)
    off = 0.8 * gap + 0.6 * _unit(rng.standard_normal((n, dim)))
    off -= (off * true).sum(1, keepdims=True) * true  # orthogonal to the true name: cosine is exactly `cos`
    return _unit(cos * true + np.sqrt(1 - cos ** 2) * _unit(off)).astype(np.float32)


def oracle(queries: np.ndarray, names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 scores [Q, N] sorted by (-score, id), and the matching ids."""
    sims = queries.astype(np.float64) @ names.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")  # stable: equal scores keep id order
    return np.take_along_axis(sims, order, 1), order


@pytest.fixture(scope="module")
def world() -> dict:
    rng = np.random.default_rng(20240607)
    names = make_names(500, rng)
    queries = make_images(names, 200, rng)
    o_scores, o_ids = oracle(queries, names)
    # The data must not hold near-ties at the top, else "top-1 equals the oracle" is not well defined in float32.
    top_gap = o_scores[:, 0] - o_scores[:, 1]
    assert top_gap.min() > 10 * SCORE_TOL, f"regenerate the data: top-1 near-tie {top_gap.min():.2e}"
    return {"names": names, "queries": queries, "o_scores": o_scores, "o_ids": o_ids}


def build(kind: str, names: np.ndarray, **kw) -> NameIndexBackend:
    index = get_backend(kind).create(names.shape[1], **kw)
    index.add(names)
    return index


def assert_rows_ordered(scores: np.ndarray, ids: np.ndarray) -> None:
    """Each row: scores non-increasing, equal scores by id ascending."""
    ds = np.diff(scores.astype(np.float64), axis=1)
    assert (ds <= 0).all(), "scores not sorted descending"
    assert (np.diff(ids, axis=1)[ds == 0] > 0).all(), "tied scores not ordered by id ascending"


# --- the data itself --------------------------------------------------------------------------------------


def test_synthetic_world_is_structured(world):
    names, queries = world["names"], world["queries"]
    np.testing.assert_allclose(np.linalg.norm(names, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1, atol=1e-6)
    # Names sharing first and last names cluster: the mean nearest-neighbour cosine is far above noise level.
    sims = names @ names.T
    np.fill_diagonal(sims, -1)
    assert sims.max(1).mean() > 0.6
    # The modality gap: images are closer to each other than to any name.
    q_sims = queries @ queries.T
    assert q_sims[np.triu_indices(len(queries), 1)].mean() > (queries @ names.T).max(1).mean()


# --- against the oracle -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", backends())
def test_top1_equals_oracle(kind, world):
    index = build(kind, world["names"])
    scores, ids = index.search(world["queries"], 1)
    assert scores.shape == ids.shape == (len(world["queries"]), 1)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids[:, 0], world["o_ids"][:, 0])
    np.testing.assert_allclose(scores[:, 0], world["o_scores"][:, 0], atol=SCORE_TOL, rtol=0)


@pytest.mark.parametrize("k", [5, 20, 100])
@pytest.mark.parametrize("kind", backends())
def test_topk_equals_oracle(kind, k, world):
    names, queries, o_scores, o_ids = world["names"], world["queries"], world["o_scores"], world["o_ids"]
    scores, ids = build(kind, names).search(queries, k)
    assert scores.shape == ids.shape == (len(queries), k)
    np.testing.assert_allclose(scores, o_scores[:, :k], atol=SCORE_TOL, rtol=0)
    # Each returned score belongs to the returned id.
    exact = np.take_along_axis(queries.astype(np.float64) @ names.astype(np.float64).T, ids, 1)
    np.testing.assert_allclose(scores, exact, atol=SCORE_TOL, rtol=0)
    assert_rows_ordered(scores, ids)
    separated = o_scores[:, k - 1] - o_scores[:, k] > SCORE_TOL
    assert separated.mean() > 0.9, "too few rows with a clear k-th place: the check would be vacuous"
    for row in np.flatnonzero(separated):
        assert set(ids[row].tolist()) == set(o_ids[row, :k].tolist()), f"query {row}"


def test_sort_topk_orders_by_score_then_id():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1],
                       [0.2, 0.2, 0.2, 0.3, 0.2]], np.float32)
    ids = np.array([[7, 3, 2, 5, 0],
                    [9, 4, 1, 8, 6]], np.int64)
    s, i = sort_topk(scores, ids)
    np.testing.assert_array_equal(i, [[3, 5, 2, 7, 0], [8, 1, 4, 6, 9]])
    np.testing.assert_array_equal(s, np.array([[0.9, 0.9, 0.5, 0.5, 0.1], [0.3, 0.2, 0.2, 0.2, 0.2]], np.float32))
    assert s.dtype == np.float32 and i.dtype == np.int64


@pytest.fixture(scope="module")
def tie_world() -> dict:
    """40 names (the size of the tiny test world) with exact duplicates: row b is a copy of row a < b."""
    rng = np.random.default_rng(7)
    names = make_names(40, rng)
    pairs = [(0, 39), (3, 17), (10, 11), (20, 30), (25, 26), (8, 33)]
    for a, b in pairs:
        names[b] = names[a]
    # Images of name a: cosine 0.9, so the duplicate pair is unambiguously the top two.
    queries = _unit(0.9 * names[[a for a, _ in pairs]]
                    + 0.1 * _unit(rng.standard_normal((len(pairs), names.shape[1])))).astype(np.float32)
    return {"names": names, "queries": queries, "pairs": pairs}


@pytest.mark.parametrize("kind", backends())
def test_exact_duplicates_ordered_by_id(kind, tie_world):
    index = build(kind, tie_world["names"])
    scores, ids = index.search(tie_world["queries"], 2)
    np.testing.assert_array_equal(ids, tie_world["pairs"])
    np.testing.assert_array_equal(scores[:, 0], scores[:, 1])  # an exact tie, not merely close
    # Over the whole ranking, each duplicate pair keeps the lower id first.
    scores, ids = index.search(tie_world["queries"], index.ntotal)
    assert_rows_ordered(scores, ids)
    for row, (a, b) in enumerate(tie_world["pairs"]):
        pos = {int(x): p for p, x in enumerate(ids[row])}
        assert pos[a] < pos[b]


@pytest.mark.parametrize("kind", backends())
def test_tie_at_kth_place_keeps_lower_id(kind, tie_world):
    """k=1 with two exact duplicates on top: the arg-max convention says the lower id wins."""
    _, ids = build(kind, tie_world["names"]).search(tie_world["queries"], 1)
    np.testing.assert_array_equal(ids[:, 0], [a for a, _ in tie_world["pairs"]])
    # Three copies, two places: the two lowest ids.
    names = tie_world["names"].copy()
    names[[12, 38]] = names[5]
    query = (names[5:6] + 0.01 * names[6:7]).astype(np.float32)
    _, ids = build(kind, names).search(query, 2)
    np.testing.assert_array_equal(ids, [[5, 12]])


# --- shapes at the edges ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", backends())
def test_k_larger_than_ntotal_returns_ntotal_columns(kind, world):
    names = world["names"][:30]
    scores, ids = build(kind, names).search(world["queries"], 100)
    assert scores.shape == ids.shape == (len(world["queries"]), 30)
    for row in ids:
        assert sorted(row.tolist()) == list(range(30))
    assert_rows_ordered(scores, ids)


@pytest.mark.parametrize("kind", backends())
def test_k_zero_returns_zero_columns(kind, world):
    scores, ids = build(kind, world["names"]).search(world["queries"], 0)
    assert scores.shape == ids.shape == (len(world["queries"]), 0)
    assert scores.dtype == np.float32 and ids.dtype == np.int64


@pytest.mark.parametrize("kind", backends())
def test_empty_index_returns_zero_columns(kind, world, tmp_path):
    index = get_backend(kind).create(DIM)
    assert index.ntotal == 0 and index.dim == DIM
    for k in (0, 1, 5):
        scores, ids = index.search(world["queries"], k)
        assert scores.shape == ids.shape == (len(world["queries"]), 0)
    path = tmp_path / f"empty{index.file_suffix}"
    index.save(path)
    loaded = get_backend(kind).load(path)
    assert loaded.ntotal == 0 and loaded.dim == DIM


@pytest.mark.parametrize("kind", backends())
def test_zero_queries(kind, world):
    scores, ids = build(kind, world["names"]).search(np.zeros((0, DIM), np.float32), 5)
    assert scores.shape == ids.shape == (0, 5)


# --- building and persistence -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", backends())
def test_add_in_chunks_equals_add_at_once(kind, world):
    names, queries = world["names"], world["queries"]
    whole = build(kind, names)
    chunked = get_backend(kind).create(DIM)
    bounds = [0, 100, 101, 350, len(names)]
    for lo, hi in zip(bounds, bounds[1:]):
        chunked.add(names[lo:hi])
        assert chunked.ntotal == hi
        # A search between adds must see exactly the rows added so far (no stale cache).
        _, ids = chunked.search(queries, 1)
        np.testing.assert_array_equal(ids[:, 0], oracle(queries, names[:hi])[1][:, 0])
    s1, i1 = whole.search(queries, 10)
    s2, i2 = chunked.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


@pytest.mark.parametrize("kind", backends())
def test_ids_continue_from_ntotal(kind, world):
    names = world["names"]
    index = build(kind, names[:200])
    index.add(names[300:310])
    _, ids = index.search(names[300:310], 1)  # each name is its own nearest neighbour
    np.testing.assert_array_equal(ids[:, 0], np.arange(200, 210))


@pytest.mark.parametrize("kind", backends())
def test_save_load_round_trip(kind, world, tmp_path):
    index = build(kind, world["names"])
    path = tmp_path / f"names{index.file_suffix}"
    index.save(path)
    assert path.is_file()
    loaded = get_backend(kind).load(path)
    assert loaded.kind == kind and loaded.dim == index.dim and loaded.ntotal == index.ntotal
    for k in (1, 10):
        s1, i1 = index.search(world["queries"], k)
        s2, i2 = loaded.search(world["queries"], k)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)


def test_flat_load_rejects_other_faiss_index(tmp_path):
    path = tmp_path / "l2.faiss"
    faiss.write_index(faiss.IndexFlatL2(DIM), str(path))
    with pytest.raises(VectorFormatError, match="IndexFlatIP"):
        get_backend("flat").load(path)


@pytest.mark.parametrize("kind", backends())
def test_index_owns_its_vectors(kind, world):
    """Mutating the array handed to `add` must not change the index."""
    names = world["names"].copy()
    index = get_backend(kind).create(DIM)
    index.add(names)
    names[:] = 0
    _, ids = index.search(world["queries"], 1)
    np.testing.assert_array_equal(ids[:, 0], world["o_ids"][:, 0])


# --- the one door: as_vectors -----------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "dim", "needle"), [
    (np.zeros(DIM, np.float32), DIM, "2-D"),
    (np.zeros((2, 3, DIM), np.float32), DIM, "2-D"),
    (np.zeros((4, DIM + 1), np.float32), DIM, f"dimension {DIM + 1}"),
    (np.zeros((4, 8), np.int64), None, "floating point"),
    (np.zeros((4, 8), np.int32), 8, "int32"),
    (np.array([[0.0, np.nan]], np.float32), 2, "NaN"),
    (np.array([[0.0, np.inf]], np.float64), 2, "infinite"),
    (np.array([[0.0, -np.inf]], np.float32), 2, "infinite"),
    (np.array([[0.0, 1e300]], np.float64), 2, "infinite"),  # finite in float64, inf once cast to float32
], ids=["1d", "3d", "wrong-dim", "int64", "int32", "nan", "inf", "-inf", "float32-overflow"])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_as_vectors_rejects(bad, dim, needle):
    with pytest.raises(VectorFormatError, match=needle) as info:
        as_vectors(bad, dim, what="queries")
    assert str(info.value).startswith("queries")
    assert isinstance(info.value, IdiaError)


def test_as_vectors_wrong_dim_names_both_dimensions():
    with pytest.raises(VectorFormatError) as info:
        as_vectors(np.zeros((3, 5), np.float32), 4)
    assert "5" in str(info.value) and "4" in str(info.value)


def test_as_vectors_converts_float64_and_non_contiguous(world):
    base = world["names"][:50].astype(np.float64)
    cases = {
        "float64": base,
        "transposed": np.ascontiguousarray(base.T).T,
        "fortran": np.asfortranarray(base),
        "row-slice": np.repeat(base, 2, axis=0)[::2],
        "column-slice": np.repeat(base, 2, axis=1)[:, ::2],
        "float16": base.astype(np.float16),
        "list": base.tolist(),
    }
    for name, x in cases.items():
        out = as_vectors(x, DIM)
        assert out.dtype == np.float32, name
        assert out.flags.c_contiguous, name
        assert out.shape == (50, DIM), name
        np.testing.assert_array_equal(out, np.asarray(x).astype(np.float32), err_msg=name)
    assert not cases["column-slice"].flags.c_contiguous  # the cases really are non-contiguous


@pytest.mark.parametrize("kind", backends())
def test_backends_take_vectors_through_the_door(kind, world):
    index = build(kind, world["names"])
    with pytest.raises(VectorFormatError, match="dimension"):
        index.add(np.zeros((2, DIM + 1), np.float32))
    with pytest.raises(VectorFormatError, match="NaN"):
        index.add(np.full((2, DIM), np.nan, np.float32))
    with pytest.raises(VectorFormatError, match="dimension"):
        index.search(np.zeros((2, DIM - 1), np.float32), 1)
    with pytest.raises(VectorFormatError, match="2-D"):
        index.search(world["queries"][0], 1)
    assert index.ntotal == len(world["names"])  # the rejected adds left no trace
    # float64, non-contiguous queries give the same answer as float32 contiguous ones.
    q = world["queries"][:40]
    awkward = np.asfortranarray(q.astype(np.float64))
    s1, i1 = index.search(q, 5)
    s2, i2 = index.search(awkward, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


# --- search parameters and the registry -------------------------------------------------------------------


@pytest.mark.parametrize("kind", backends())
def test_exact_backends_reject_unknown_search_params(kind, world):
    index = build(kind, world["names"])
    with pytest.raises(VectorFormatError, match="nprobe"):
        index.search(world["queries"], 5, {"nprobe": 8})
    # No parameters, given either way, is fine and changes nothing.
    s0, i0 = index.search(world["queries"], 5)
    s1, i1 = index.search(world["queries"], 5, {})
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(s0, s1)


def test_registry_holds_the_builtin_backends():
    kinds = backend_kinds()
    assert {"flat", "dense", "faiss", "ensemble"} <= set(kinds)
    assert kinds == sorted(kinds)
    for kind in kinds:
        assert get_backend(kind).kind == kind
    for kind in backends():
        cls = get_backend(kind)
        assert cls.kind == kind
        assert cls.file_suffix.startswith(".")
        assert isinstance(cls.create(4), NameIndexBackend)


def test_unknown_backend_lists_known_kinds():
    with pytest.raises(UnknownBackendError) as info:
        get_backend("nope")
    msg = str(info.value)
    assert "'nope'" in msg
    for kind in backend_kinds():
        assert kind in msg
    assert isinstance(info.value, IdiaError) and info.value.exit_code == 2


# --- GPU --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", backends())
def test_use_gpu_without_gpu_falls_back_to_cpu(kind, world, tmp_path, monkeypatch, caplog):
    if faiss_gpu_count() > 0 or torch.cuda.is_available():
        # On a GPU machine, simulate one without: the fallback path is what is under test.
        monkeypatch.setattr("idia_engine.indexes.gpu.faiss_gpu_count", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level(logging.WARNING)
    cpu = build(kind, world["names"])
    gpu = build(kind, world["names"], use_gpu=True)
    assert gpu.on_gpu is False
    s1, i1 = cpu.search(world["queries"], 10)
    s2, i2 = gpu.search(world["queries"], 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    path = tmp_path / f"names{gpu.file_suffix}"
    gpu.save(path)
    loaded = get_backend(kind).load(path, use_gpu=True)
    assert loaded.on_gpu is False
    s3, i3 = loaded.search(world["queries"], 10)
    np.testing.assert_array_equal(i1, i3)
    np.testing.assert_array_equal(s1, s3)
    if kind == "flat":
        assert "no GPU" in caplog.text  # the fallback is logged, not silent


def _assert_matches_cpu(cpu: NameIndexBackend, gpu: NameIndexBackend, world: dict) -> None:
    o_scores = world["o_scores"]
    s1, i1 = cpu.search(world["queries"], 20)
    s2, i2 = gpu.search(world["queries"], 20)
    np.testing.assert_array_equal(i2[:, 0], i1[:, 0])
    np.testing.assert_allclose(s2, s1, atol=SCORE_TOL, rtol=0)
    assert_rows_ordered(s2, i2)
    separated = o_scores[:, 19] - o_scores[:, 20] > SCORE_TOL
    for row in np.flatnonzero(separated):
        assert set(i2[row].tolist()) == set(i1[row].tolist()), f"query {row}"


@pytest.mark.gpu
@pytest.mark.skipif(faiss_gpu_count() == 0, reason="faiss sees no GPU")
def test_flat_gpu_matches_cpu(world, tmp_path):
    cpu = build("flat", world["names"])
    gpu = build("flat", world["names"], use_gpu=True)
    assert gpu.on_gpu is True
    _assert_matches_cpu(cpu, gpu, world)
    # Saved from the GPU, loaded on the CPU: the same index.
    path = tmp_path / "names.faiss"
    gpu.save(path)
    back = get_backend("flat").load(path)
    assert back.on_gpu is False and back.ntotal == cpu.ntotal
    s1, i1 = cpu.search(world["queries"], 10)
    s2, i2 = back.search(world["queries"], 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")
def test_dense_gpu_matches_cpu(world):
    _assert_matches_cpu(build("dense", world["names"]), build("dense", world["names"], use_gpu=True), world)


# --- index kinds: built into a directory, searched through the engine's view of it -----------------------

N_TEMPLATES = 3
# Every kind's way through build and search: exact, IVF lists, codes scanned whole, no bound, the ensemble.
KINDS = ["flat", "dense", "faiss:IVF16,SQ8", "faiss:SQ8", "faiss:HNSW16,Flat", "ensemble", "bf16", "ensemble-bf16"]


class FakeIndexData:
    """The engine's opened index as far as searchers see it (data_dir, num_templates, load_template, vectors)."""

    def __init__(self, data_dir: Path, kind: type[IndexKind], shape: tuple[int, int, int]):
        self._data_dir, self._kind, self._shape = data_dir, kind, shape
        self.loaded: list[int] = []

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def num_templates(self) -> int:
        return self._shape[0]

    def load_template(self, t: int, *, use_gpu: bool = False) -> NameIndexBackend:
        backend = self._kind.load(self._data_dir / template_file(t, self._kind.file_suffix), use_gpu=use_gpu)
        assert (backend.ntotal, backend.dim) == self._shape[1:]
        self.loaded.append(t)
        return backend

    def vectors(self, t: int) -> np.ndarray:
        return self._kind.raw_rows(self._data_dir, t)


@pytest.fixture(scope="module")
def template_world(world) -> dict:
    """N_TEMPLATES views of the world's names (each perturbed and renormalised), the world's image queries."""
    rng = np.random.default_rng(11)
    views = [_unit(world["names"] + 0.15 * _unit(rng.standard_normal(world["names"].shape))).astype(np.float32)
             for _ in range(N_TEMPLATES)]
    q64 = world["queries"].astype(np.float64)
    sims = [np.sort(q64 @ v.astype(np.float64).T, axis=1)[:, ::-1] for v in views]
    assert min(float((s[:, 0] - s[:, 1]).min()) for s in sims) > 10 * SCORE_TOL, "regenerate: top-1 near-tie"
    top1 = np.stack([np.argmax(q64 @ v.astype(np.float64).T, axis=1) for v in views], axis=1)
    return {"views": views, "queries": world["queries"], "top1": top1}


def build_dir(kind: str, views: list[np.ndarray], out: Path) -> FakeIndexData:
    """What the engine's build does: each template's rows on disk, build_template, store_raw_rows, the vectors
    file dropped where the kind does not keep it (exact kinds answer from their own rows, bf16 kinds keep low
    halves), finish_build over the raw rows."""
    cls = get_backend(kind)
    for t, rows in enumerate(views):
        np.save(out / vectors_file(t), rows)
        cls.build_template(t, np.load(out / vectors_file(t), mmap_mode="r"), out, use_gpu=False, search_params={})
        cls.store_raw_rows(t, out)
        if not cls.keeps_vectors_file():
            (out / vectors_file(t)).unlink()
    steps: list[tuple[str, int, int]] = []
    cls.finish_build(out, [] if cls.exact_search else [cls.raw_rows(out, t) for t in range(len(views))],
                     progress=lambda *a: steps.append(a))
    if kind == "ensemble":
        assert steps and steps[-1][1] == steps[-1][2]  # the ensemble build reports progress to its end
    return FakeIndexData(out, cls, (len(views), *views[0].shape))


def search_all(data: FakeIndexData, kind: str, queries: np.ndarray, k: int, params: Mapping[str, Any] | None,
               fallback: bool) -> dict:
    """Every searcher of the kind once, in turn (as the engine iterates them): results per template."""
    out: dict = {}
    for searcher in get_backend(kind).open_searchers(data, use_gpu=False):
        res = searcher.search(queries, k, params, fallback)
        assert res.templates == searcher.templates
        for j, t in enumerate(res.templates):
            assert t not in out, "a template answered twice"
            out[t] = (res.scores[:, j], res.ids[:, j], res.exact_by_index[:, j], res.certified[:, j],
                      res.fell_back[:, j], res.uncertified_kept[:, j])
        assert res.scores.dtype == np.float32 and res.ids.dtype == np.int64
        assert res.scores.shape == res.ids.shape == (len(queries), len(res.templates), k)
        assert res.certified.shape == res.fell_back.shape == res.exact_by_index.shape == res.ids.shape[:2]
    assert sorted(out) == list(range(data.num_templates))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_kind_builds_a_directory_and_searches_it_exactly(kind, template_world, tmp_path):
    data = build_dir(kind, template_world["views"], tmp_path)
    cls = get_backend(kind)
    if issubclass(cls, NameIndexBackend):
        for t in range(N_TEMPLATES):
            assert (tmp_path / template_file(t, cls.file_suffix)).is_file()
    else:
        assert sorted(p.name for p in (tmp_path / "ensemble").iterdir()) == sorted(
            ["ensemble.json", "means.npy", "offsets.npy", "radius.npy", "radius_name.npy"]
            + (["means.bf16.npz"] if kind == "ensemble-bf16" else []))
    kept = sorted(p.name for p in tmp_path.glob("vectors_*"))
    if kind in ("bf16", "ensemble-bf16"):  # float32 rows = bf16 rows + int16 low halves: no float32 file
        assert kept == [low_file(t) for t in range(N_TEMPLATES)]
    else:
        assert kept == ([] if cls.exact_search else [vectors_file(t) for t in range(N_TEMPLATES)])
    params = {"candidates": 32} if kind.startswith("ensemble") else None
    results = search_all(data, kind, template_world["queries"], 3, params, fallback=True)
    for t, (scores, ids, by_index, certified, fell_back, kept) in results.items():
        np.testing.assert_array_equal(ids[:, 0], template_world["top1"][:, t], err_msg=f"{kind} template {t}")
        assert_rows_ordered(scores, ids)
        assert not kept.any()
        if cls.exact_search:
            assert by_index.all() and not certified.any() and not fell_back.any()
        else:
            assert not by_index.any() and (certified | fell_back).all() and not (certified & fell_back).any()
    if kind == "faiss:HNSW16,Flat":  # no bound: every answer is the brute force's
        assert all(r[4].all() for r in results.values())
    if kind == "faiss:SQ8":  # codes scanned whole: the certificate holds for most image queries
        assert np.mean([r[3].mean() for r in results.values()]) > 0.5


@pytest.mark.parametrize("kind", [k for k in KINDS if not get_backend(k).exact_search])
def test_kind_without_fallback_flags_what_it_could_not_certify(kind, template_world, tmp_path):
    data = build_dir(kind, template_world["views"], tmp_path)
    results = search_all(data, kind, template_world["queries"], 1, None, fallback=False)
    for t, (_, ids, by_index, certified, fell_back, kept) in results.items():
        assert not fell_back.any() and not by_index.any()
        np.testing.assert_array_equal(kept, ~certified)
        np.testing.assert_array_equal(ids[certified, 0], template_world["top1"][certified, t])


def test_per_template_searchers_load_one_template_at_a_time(template_world, tmp_path):
    data = build_dir("flat", template_world["views"], tmp_path)
    searchers = get_backend("flat").open_searchers(data, use_gpu=False)
    first = next(searchers)
    assert data.loaded == [0] and first.templates == (0,)
    first.search(template_world["queries"], 1, None, True)
    second = next(searchers)
    assert data.loaded == [0, 1] and second.templates == (1,)
    with pytest.raises(RuntimeError, match="moved on"):  # the first template's index was let go
        first.search(template_world["queries"], 1, None, True)
    searchers.close()


def test_build_template_refuses_too_few_names_to_train(tmp_path):
    rows = _unit(np.random.default_rng(0).standard_normal((30, DIM))).astype(np.float32)
    with pytest.raises(InputError, match=r"index faiss:IVF64,Flat needs at least 64 names to train, the names "
                                         r"file holds 30; choose a smaller index \(e\.g\. --index flat\)"):
        get_backend("faiss:IVF64,Flat").build_template(0, rows, tmp_path, use_gpu=False, search_params={})


def test_build_template_passes_search_params_and_trains_on_a_seeded_sample(world, tmp_path):
    for out in (tmp_path / "a", tmp_path / "b"):
        out.mkdir()
        get_backend("faiss:IVF16,Flat").build_template(0, world["names"], out, use_gpu=False,
                                                       search_params={"nprobe": 5})
    built = get_backend("faiss:IVF16,Flat").load(tmp_path / "a" / template_file(0, ".faiss"))
    assert built.search_params == {"nprobe": 5} and built.ntotal == len(world["names"])
    assert (tmp_path / "a" / template_file(0, ".faiss")).read_bytes() == (
        tmp_path / "b" / template_file(0, ".faiss")).read_bytes()  # the same sample, the same index


# --- the ensemble kind and the base classes' defaults ------------------------------------------------------


def test_ensemble_is_a_registered_kind():
    assert "ensemble" in backend_kinds()
    cls = get_backend("ensemble")
    assert cls is EnsembleIndex and issubclass(cls, IndexKind) and not issubclass(cls, NameIndexBackend)
    assert cls.kind == "ensemble" and cls.exact_search is False
    import inspect

    assert inspect.signature(TemplateEnsemble.search).parameters["candidates"].default == DEFAULT_CANDIDATES


def test_importing_the_package_first_works():
    """The indexes package imports without the engine package having been imported before it."""
    subprocess.run([sys.executable, "-c", "import idia_engine.indexes as i; i.get_backend('ensemble')"], check=True)


@pytest.mark.parametrize("kind", ["flat", "dense", "ensemble"])
def test_kind_without_spec_refuses_one(kind):
    with pytest.raises(UnknownBackendError) as info:
        get_backend(f"{kind}:IVF64,Flat")
    assert str(info.value) == f"index kind {kind!r} takes no spec, got {kind + ':IVF64,Flat'!r}"


@pytest.mark.parametrize("kind", ["flat", "dense"])
def test_exact_backends_refuse_default_search_params(kind):
    with pytest.raises(VectorFormatError, match=r"takes no search parameters, got \['nprobe'\]"):
        get_backend(kind).create(DIM, search_params={"nprobe": 8})
    assert get_backend(kind).create(DIM, search_params={}).ntotal == 0


class _ListBackend(NameIndexBackend):
    """The smallest per-template backend: exact numpy search, relying on every default of the base class."""

    kind: ClassVar[str] = "test-list"  # not registered
    file_suffix: ClassVar[str] = ".npy"

    def __init__(self, dim: int):
        self._rows = np.zeros((0, dim), np.float32)

    @classmethod
    def create(cls, dim, *, use_gpu=False, search_params=None):
        return cls(dim)

    @classmethod
    def load(cls, path, *, use_gpu=False):
        backend = cls(0)
        backend._rows = np.load(path)
        return backend

    @property
    def dim(self) -> int:
        return self._rows.shape[1]

    @property
    def ntotal(self) -> int:
        return len(self._rows)

    def add(self, vectors):
        self._rows = np.concatenate([self._rows, as_vectors(vectors, self.dim)])

    def search(self, queries, k, params=None):
        sims = as_vectors(queries, self.dim) @ self._rows.T
        ids = np.broadcast_to(np.arange(self.ntotal), sims.shape)
        s, i = sort_topk(sims, ids)
        return s[:, :k], i[:, :k]

    def save(self, path):
        np.save(path, self._rows)


def test_base_class_defaults(world):
    backend = _ListBackend.create(DIM)
    assert not backend.needs_training and backend.min_train_size == 1 and backend.recommended_train_size == 1
    assert backend.on_gpu is False and backend.exact_search is False
    backend.train(world["names"][:10])  # nothing to learn
    assert backend.ntotal == 0
    with pytest.raises(VectorFormatError, match="training sample"):
        backend.train(np.zeros((3, DIM + 1), np.float32))
    backend.add(world["names"])
    cand = backend.search_candidates(world["queries"], 5)
    assert cand.ids.shape == (len(world["queries"]), 5) and (cand.bound == np.inf).all()  # nothing known
    assert (backend.search_candidates(world["queries"], len(world["names"])).bound == -np.inf).all()
    with pytest.raises(UnknownBackendError, match="takes no spec"):
        _ListBackend.with_spec("x")


@pytest.mark.parametrize("kind", ["flat", "dense"])
def test_exact_backends_bound_left_out_rows_by_the_last_score(kind, world):
    names, queries = world["names"], world["queries"]
    backend = build(kind, names)
    cand = backend.search_candidates(queries, 10)
    sims = queries.astype(np.float64) @ names.astype(np.float64).T
    np.put_along_axis(sims, cand.ids, -np.inf, axis=1)
    assert (sims.max(axis=1) <= cand.bound).all()  # every row left out scores at most the bound
    slack = cand.bound - cand.scores[:, -1].astype(np.float64)
    assert (slack > 0).all() and (slack <= 2 * gamma(DIM)).all()  # the k'-th score plus float32 rounding only
    assert (backend.search_candidates(queries, len(names)).bound == -np.inf).all()
    assert (backend.search_candidates(queries, 0).bound == np.inf).all()


def test_dense_search_holds_tf32_off_and_restores_the_callers_setting(monkeypatch):
    import torch
    from idia_engine.indexes import dense

    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32))
        return real(a, b)

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
        backend = dense.DenseTorchBackend.create(4)
        backend.add(np.eye(4, dtype=np.float32))
        backend.search(np.eye(4, dtype=np.float32)[:2], 1)
        assert seen and all(s == ("highest", False) for s in seen)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)



# --- factory strings that crash faiss, and sidecars of the wrong types ------------------------------------


@pytest.mark.parametrize("factory, pattern", [
    ("HNSW0,Flat", r"parameter of 0"), ("PQ16x0", r"parameter of 0"), ("OPQ16_0,PQ16", r"parameter of 0"),
    ("RR0,Flat", r"parameter of 0"), ("HNSW1,Flat", r"graph degree 1"), ("NSG1,Flat", r"graph degree 1"),
    ("PQ8x24", r"24-bit codes"), ("IVF2000000000,Flat", r"at most 1048576"),
])
def test_factory_strings_that_crash_faiss_are_refused_before_faiss_sees_them(factory, pattern):
    from idia_engine.indexes.errors import IndexSpecError
    from idia_engine.indexes.faiss_backend import FaissBackend

    with pytest.raises(IndexSpecError, match=pattern):
        FaissBackend.with_spec(factory)


@pytest.mark.parametrize("factory", ["IVF4096,SQ8", "HNSW32,Flat", "IVF1024,PQ16x4fs", "SQfp16", "L2norm,Flat",
                                     "OPQ16_64,IVF4,PQ16", "PRQ2x4x8"])
def test_usual_factory_strings_pass_the_pre_parse(factory):
    from idia_engine.indexes.faiss_backend import check_factory_numbers

    check_factory_numbers(factory)


def test_sidecar_of_wrong_types_is_an_index_file_error(tmp_path):
    import json

    from idia_engine.indexes.errors import IndexFileError
    from idia_engine.indexes.faiss_backend import FaissBackend

    backend = FaissBackend.with_spec("Flat").create(8)
    backend.add(np.eye(8, dtype=np.float32))
    backend.save(tmp_path / "t.faiss")
    side = tmp_path / "t.faiss.json"
    meta = json.loads(side.read_text(encoding="utf-8"))
    for change, pattern in [({"description": {**meta["description"], "dim": "8"}}, r"key 'description\.dim'"),
                            ({"description": [1]}, r"key 'description' must be an object"),
                            ({"stats": 3}, r"key 'stats' must be an object or null")]:
        side.write_text(json.dumps({**meta, **change}), encoding="utf-8")
        with pytest.raises(IndexFileError, match=pattern):
            FaissBackend.load(tmp_path / "t.faiss")


def test_cpu_products_run_in_torch_at_full_float32_and_leave_numpys_blas_idle(monkeypatch):
    """The brute force's GEMM and the re-rank's screen go through `indexes.matmul`: torch, precision held at
    "highest" (a caller's "medium" would let oneDNN multiply float32 in bf16), never numpy's BLAS (whose own
    threads, spinning beside torch's, slowed the next bf16 scans 2-5x on a 2-core CPU)."""
    import torch
    from idia_engine.indexes import exact, matmul

    seen = []
    real = torch.matmul

    def spy(a, b):
        seen.append(torch.get_float32_matmul_precision())
        return real(a, b)

    def no_numpy_blas(*args, **kwargs):
        raise AssertionError("numpy's BLAS was called")

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 32)).astype(np.float32)
    queries = rng.standard_normal((5, 32)).astype(np.float32)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        monkeypatch.setattr(matmul.torch, "matmul", spy)
        monkeypatch.setattr(exact.np, "matmul", no_numpy_blas, raising=True)
        scores, ids = exact.exact_topk(rows, queries, 3)
        among = exact.exact_topk_among(rows, queries, np.tile(np.arange(40), (5, 1)), 3)
        assert seen and all(s == "highest" for s in seen)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    want = np.argsort(-(rows.astype(np.float64) @ queries.T.astype(np.float64)), axis=0, kind="stable")[:3].T
    assert np.array_equal(ids, want)
    assert np.array_equal(among[1], np.argsort(-(rows[:40].astype(np.float64) @ queries.T.astype(np.float64)),
                                               axis=0, kind="stable")[:3].T)
