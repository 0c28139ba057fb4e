"""The template-ensemble prefilter (indexes/ensemble.py) against a brute-force oracle on structured data.

Two worlds from the benchmark generator (benchmarks/synthetic.py): CLIP-like image queries (top score ~0.3,
residual radius ~0.2: certificates are rare, exactness comes from the fallback) and "tight" data (template
noise 0.02, queries near their names) where the certificate holds for most queries. Tolerance: scores equal
to the float64 oracle within SCORE_TOL; ids compared where the oracle's top-2 gap exceeds TIE_GAP.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from idia_engine.benchmarks.synthetic import SyntheticConfig, SyntheticNames
from idia_engine.indexes import FaissBackend, get_backend
from idia_engine.indexes.base import IndexFileError, VectorFormatError
from idia_engine.indexes.ensemble import TemplateEnsemble

N, DIM, T = 3000, 64, 21
SCORE_TOL = 1e-5
TIE_GAP = 1e-6


def _world(**over) -> dict:
    cfg = dataclasses.replace(SyntheticConfig(num_names=N, dim=DIM, num_templates=T, seed=3, first_pool=200,
                                              last_pool=600), **over)
    gen = SyntheticNames(cfg)
    views = [gen.template(t) for t in range(T)]
    q, person, true = gen.queries(8, 10)
    return {"gen": gen, "views": views, "q": q, "true": true, "person": person}


@pytest.fixture(scope="module")
def clip_like() -> dict:
    w = _world()
    w["ens"] = TemplateEnsemble.build(w["views"], N, T, DIM, block_names=700)
    return w


@pytest.fixture(scope="module")
def tight() -> dict:
    w = _world(noise=0.02, template=0.05)
    rng = np.random.default_rng(0)
    ids = rng.integers(N, size=60)
    q = w["gen"].name_vectors(ids) + 0.05 * rng.standard_normal((60, DIM)) / np.sqrt(DIM)
    w["q"] = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    w["ens"] = TemplateEnsemble.build(w["views"], N, T, DIM)
    return w


def _oracle(w: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 top-1 ids [Q, T], scores [Q, T] and the top-2 gap [Q, T]."""
    q64 = w["q"].astype(np.float64)
    ids, top, gap = [], [], []
    for x in w["views"]:
        s = q64 @ x.astype(np.float64).T
        order = np.argsort(-s, axis=1, kind="stable")[:, :2]
        two = np.take_along_axis(s, order, 1)
        ids.append(order[:, 0])
        top.append(two[:, 0])
        gap.append(two[:, 0] - two[:, 1])
    return np.stack(ids, 1), np.stack(top, 1), np.stack(gap, 1)


@pytest.mark.parametrize("which", ["clip_like", "tight"])
def test_with_fallback_equals_exact_everywhere(which, request):
    w = request.getfixturevalue(which)
    res = w["ens"].search(w["q"], w["views"], k=1, candidates=64, fallback=True)
    ids, top, gap = _oracle(w)
    assert res.exact.all()
    np.testing.assert_allclose(res.scores[:, :, 0], top, atol=SCORE_TOL)
    clear = gap > TIE_GAP
    assert clear.mean() > 0.99
    assert (res.top1[clear] == ids[clear]).all()


@pytest.mark.parametrize("which", ["clip_like", "tight"])
def test_certified_are_exact_and_bound_holds(which, request):
    w = request.getfixturevalue(which)
    res = w["ens"].search(w["q"], w["views"], k=1, candidates=64, fallback=False)
    assert not res.fell_back.any()
    ids, _, _ = _oracle(w)
    assert (res.top1[res.certified] == ids[res.certified]).all()
    # Bound validity by brute force: every name outside the candidates scores <= bound, in every template.
    cand = w["ens"].candidates(w["q"], 64).ids
    q64 = w["q"].astype(np.float64)
    for t, x in enumerate(w["views"]):
        s = q64 @ x.astype(np.float64).T
        np.put_along_axis(s, cand, -np.inf, 1)
        assert (s.max(axis=1) <= res.bound[:, t]).all()
    if which == "tight":
        assert res.certified.mean() > 0.9  # small residuals: the certificate does its job
    else:
        assert (res.top1 == ids).mean() > 0.98  # rare certificates, but the re-ranked answer is nearly always right


def test_radius_and_offsets_by_brute_force(clip_like):
    ens, views = clip_like["ens"], clip_like["views"]
    x = np.stack(views).astype(np.float64)
    m = ens.means.astype(np.float64)
    np.testing.assert_allclose(m, x.mean(0), atol=1e-6)
    np.testing.assert_allclose(ens.offsets, (x - m).mean(1), atol=1e-9)
    norms = np.linalg.norm(x - m - ens.offsets[:, None], axis=2)
    assert (norms.max(1) <= ens.radius).all() and np.allclose(norms.max(1), ens.radius, rtol=1e-6)
    assert (norms.max(0) <= ens.radius_name).all()


def test_callable_source_backend_and_template_subset(clip_like):
    w = clip_like
    ens, gen = w["ens"], w["gen"]
    a = ens.search(w["q"], w["views"], k=3, candidates=48, fallback=True)
    b = ens.search(w["q"], gen, k=3, candidates=48, fallback=True, templates=[0, 5, 20])
    np.testing.assert_array_equal(a.ids[:, [0, 5, 20]], b.ids)
    np.testing.assert_array_equal(a.scores[:, [0, 5, 20]], b.scores)
    # Stage 1 through an SQ8 backend over the means: its bound is used; with fallback still exact.
    sq8 = get_backend("faiss:SQ8").create(DIM)
    assert isinstance(sq8, FaissBackend)
    sq8.train(ens.means)
    sq8.add(ens.means)
    c = ens.search(w["q"], w["views"], k=3, candidates=48, fallback=True, backend=sq8)
    np.testing.assert_array_equal(c.top1, a.top1)
    per = c.per_template(4)
    assert per.ids.shape == (len(w["q"]), 3) and per.exact.all()


def test_save_load_round_trip(clip_like, tmp_path):
    ens = clip_like["ens"]
    ens.save(tmp_path / "ens")
    back = TemplateEnsemble.load(tmp_path / "ens")
    for key in ("means", "offsets", "radius", "radius_name"):
        np.testing.assert_array_equal(getattr(back, key), getattr(ens, key))
    r1 = ens.search(clip_like["q"], clip_like["views"], fallback=False)
    r2 = back.search(clip_like["q"], clip_like["views"], fallback=False)
    np.testing.assert_array_equal(r1.ids, r2.ids)
    with pytest.raises(IndexFileError):
        TemplateEnsemble.load(tmp_path / "missing")


def test_bad_inputs(clip_like):
    ens = clip_like["ens"]
    with pytest.raises(VectorFormatError):
        ens.search(clip_like["q"][:, :10], clip_like["views"])
    with pytest.raises(VectorFormatError):
        ens.search(clip_like["q"], clip_like["views"], candidates=0)
    with pytest.raises(VectorFormatError):
        ens.search(clip_like["q"], [v.astype(np.float64) for v in clip_like["views"]])


def test_float32_screen_then_float64_refine_equals_a_float64_rerank():
    """Stage 2 screens in float32; near-ties within float32 error must still come out as the engine's exact
    score (`exact_dot` of every candidate, sorted) ranks them, -1 candidates and k beyond them included."""
    from idia_engine.indexes.base import sort_topk
    from idia_engine.indexes.ensemble import _rerank
    from idia_engine.indexes.exact import exact_dot

    rng = np.random.default_rng(7)
    d, u, nq, kc = 64, 400, 50, 120
    base = rng.standard_normal((20, d))
    # 400 rows in 20 clusters of near-duplicates (differences ~1e-7): float32 cannot order them reliably.
    rows = base[np.arange(u) % 20] + 1e-7 * rng.standard_normal((u, d))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    q = rng.standard_normal((nq, d))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    inv = np.stack([rng.choice(u, kc, replace=False) for _ in range(nq)])
    uniq = np.arange(u, dtype=np.int64) * 3  # candidate ids need not equal row positions
    cid = uniq[inv]
    valid = np.ones_like(inv, bool)
    valid[:, -5:] = False
    valid[0, 3:] = False  # a query with 3 candidates: k = 5 leaves -inf / -1 at the end
    for k in (1, 5):
        ss, si = _rerank(rows, uniq, inv, valid, q, k)
        full = exact_dot(rows[inv], q[:, None, :])
        full[~valid] = -np.inf
        ref_s, ref_i = sort_topk(full, np.where(valid, cid, -1))
        ref_i[~np.isfinite(ref_s)] = -1
        assert np.array_equal(si[:, :k], ref_i[:, :k]) and np.array_equal(ss[:, :k], ref_s[:, :k])


def test_read_rows_from_a_mapped_file_equals_indexing_it(tmp_path):
    """Candidate rows are read from a vectors file with pread (nothing of the file stays mapped): the same rows
    as indexing the memmap, for runs of consecutive ids, single ids, the last row, none, and views."""
    from idia_engine.indexes.vectors import read_rows

    x = np.random.default_rng(2).standard_normal((1000, 24)).astype(np.float32)
    np.save(tmp_path / "v.npy", x)
    mm = np.load(tmp_path / "v.npy", mmap_mode="r")
    for ids in ([0, 1, 2, 3, 500, 501, 999], [7], [], list(range(1000))):
        got = read_rows(mm, np.array(ids, np.int64))
        assert got.shape == (len(ids), 24) and np.array_equal(got, x[ids]) and not isinstance(got, np.memmap)
    assert np.array_equal(read_rows(mm[10:], np.array([0, 5])), x[[10, 15]])  # a view falls back to indexing
    assert np.array_equal(read_rows(x, np.array([3, 4])), x[[3, 4]])
    assert np.array_equal(read_rows(mm, slice(998, None)), x[998:]) and read_rows(x, slice(2, 5)).base is x
