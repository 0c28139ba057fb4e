"""The bf16 scan's bound, at its edge, and exact answers from it where bf16 cannot tell rows apart.

The bound is checked against rows and queries built to make every rounding go the same way (each term of
the bound is then reached, not just respected); the search against near-ties bf16 cannot order, where the
certificate must refuse and the brute force answer; the arithmetic probe against a kernel that
accumulates in bf16. The decisions of whole queries through this kind equal flat's in
test_index_build.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from idia_engine.indexes import get_backend
from idia_engine.indexes.bf16 import (
    MAX_LOOK_BLOCKS,
    OUTPUT_ROUNDING,
    SELECT_BLOCK,
    BF16ScanBackend,
    keeps_the_bound,
)
from idia_engine.indexes.bounds import gamma
from idia_engine.indexes.errors import VectorFormatError
from idia_engine.indexes.exact import Exactness, exact_topk, search_exact

D = 512


def just_below_half_step(scale: float, n: int) -> np.ndarray:
    """float32 values just below the midpoint between `scale` (a power of two) and the next bf16 number: each
    rounds down to `scale`, by almost half a bf16 step, the most round-to-nearest can lose."""
    return np.full(n, scale * (1 + 2.0 ** -8 - 2.0 ** -20), np.float32)


def test_the_bound_holds_and_its_rounding_terms_are_reached():
    x = just_below_half_step(2.0 ** -5, D)[None, :]  # every element rounds down: q^.x^ < q.x by the most
    q = x.copy()
    backend = BF16ScanBackend.create(D)
    backend.add(x)
    computed = float(backend.search(q, 1)[0][0, 0])
    assert computed == 0.5  # (2^-5)^2 x 512, exact in bf16: no output rounding, the rest is the inputs'
    real = float(q[0].astype(np.float64) @ x[0].astype(np.float64))
    bound = float(backend.upper_bound(q, np.array([computed]))[0])
    assert real <= bound
    q_rounding = float(np.linalg.norm(q[0].astype(np.float64) - 2.0 ** -5))
    rounding_terms = q_rounding * backend.max_norm + np.sqrt(D) * 2.0 ** -5 * backend.max_rounding
    # The inputs' rounding terms are reached within 1 %: no looser than they must be, and none can go.
    assert real - computed >= 0.99 * rounding_terms


def test_the_output_rounding_term_is_needed():
    """Inputs exact in bf16, a float32 sum just below a bf16 midpoint: the scan's output rounds down by almost
    2^-8, which only the output term covers."""
    x = np.zeros((1, D), np.float32)
    q = np.zeros((1, D), np.float32)
    x[0, :2] = [1.0, 2.0 ** -8 - 2.0 ** -16]  # 2^-9 x 1.1111111b: 8 significant bits, exact in bf16
    q[0, :2] = 1.0
    backend = BF16ScanBackend.create(D)
    backend.add(x)
    computed = float(backend.search(q, 1)[0][0, 0])
    real = 1.0 + 2.0 ** -8 - 2.0 ** -16
    assert computed == 1.0 and backend.max_rounding == 0.0
    bound = float(backend.upper_bound(q, np.array([computed]))[0])
    assert real <= bound
    assert real > computed + gamma(D) * backend.max_norm_rounded * float(np.linalg.norm(q))  # the rest alone: short
    assert real - computed > 0.49 * OUTPUT_ROUNDING  # half of the term: round-to-nearest's worst case


def test_every_left_out_row_is_under_the_bound_on_structured_rows():
    rng = np.random.default_rng(3)
    centre = rng.standard_normal(D)
    rows = centre + 0.6 * rng.standard_normal((4000, D))  # one shared direction, as name prompts share one
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    queries = (0.3 * centre / np.linalg.norm(centre) + rng.standard_normal((64, D)) / np.sqrt(D)).astype(np.float32)
    backend = BF16ScanBackend.create(D)
    backend.add(rows[:1500])
    backend.add(rows[1500:])  # bounds gathered over several adds
    cand = backend.search_candidates(queries, 20)
    real = queries.astype(np.float64) @ rows.T.astype(np.float64)
    for qi in range(len(queries)):
        left_out = np.setdiff1d(np.arange(len(rows)), cand.ids[qi])
        assert real[qi, left_out].max() <= cand.bound[qi]
    assert np.median(cand.bound - real.max(axis=1)) < 0.02  # and it is a bound that can certify


def near_tie_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(D)
    rows = u + 1e-3 * rng.standard_normal((n, D))  # cosines within ~1e-5 of each other: bf16 cannot order them
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return rows, (u + 1e-3 * rng.standard_normal((16, D))).astype(np.float32)


def test_near_ties_bf16_cannot_order_are_scored_exactly_block_by_block():
    """Every block's bound reaches the top score, so the second look scores them all exactly (3000 rows are
    fewer than MAX_LOOK_BLOCKS blocks): the answer is exact and certified, without brute force."""
    assert 3000 <= SELECT_BLOCK * MAX_LOOK_BLOCKS
    rows, queries = near_tie_rows(3000, 5)
    backend = BF16ScanBackend.create(D)
    backend.add(rows)
    first = backend.search_candidates(queries, 5 + BF16ScanBackend.extra_candidates)
    assert (first.bound >= exact_topk(rows, queries, 1)[0][:, 0]).all()  # the candidates alone certify nothing
    result = search_exact(backend, rows, queries, 5, need=Exactness.TOPK)
    scores, ids = exact_topk(rows, queries, 5)
    assert result.certified_topk.all() and not result.fell_back.any()
    assert np.array_equal(result.ids, ids) and np.array_equal(result.scores, scores)


def test_many_query_blocks_and_row_chunks_answer_as_one(monkeypatch):
    """Queries in blocks of 5 and rows in chunks of 2 SELECT_BLOCKs (merged top-k's, block maxima stitched
    across chunks, second looks in some query blocks only) give the exact answer, as one block and one chunk do."""
    import idia_engine.indexes.bf16 as bf16

    ties, tie_queries = near_tie_rows(SELECT_BLOCK * 12, 3)
    rng = np.random.default_rng(4)
    other = rng.standard_normal((SELECT_BLOCK * 9 + 17, D))  # a short last block and chunk
    rows = np.concatenate([ties, (other / np.linalg.norm(other, axis=1, keepdims=True)).astype(np.float32)])
    separated = rows[-12:] * 0.5 + rng.standard_normal((12, D)) * 0.02
    queries = np.concatenate([tie_queries[:4], separated]).astype(np.float32)
    backend = BF16ScanBackend.create(D)
    backend.add(rows)
    whole = search_exact(backend, rows, queries, 3, need=Exactness.TOPK)
    monkeypatch.setattr(bf16, "QUERY_BLOCK", 5)
    monkeypatch.setattr(bf16, "MIN_ROW_CHUNK", 2 * SELECT_BLOCK)
    monkeypatch.setattr(bf16, "WORKSPACE_BYTES", 1)
    assert bf16._row_chunk(5) == 2 * SELECT_BLOCK
    split = search_exact(backend, rows, queries, 3, need=Exactness.TOPK)
    scores, ids = exact_topk(rows, queries, 3)
    for result in (whole, split):
        assert result.certified_topk.all() and not result.fell_back.any()
        assert np.array_equal(result.ids, ids) and np.array_equal(result.scores, scores)
    found = backend.search_candidates(queries, 3 + BF16ScanBackend.extra_candidates)
    looked = found.bound >= scores[:, 2]  # the candidates alone could not certify these: second looks
    assert looked[:4].all() and not looked[4:].any()
    assert np.array_equal(found.ids[4:, 0], ids[4:, 0])  # the scan's own top-1s, found in the last chunk


def test_near_ties_over_more_blocks_than_the_second_look_takes_are_brute_forced():
    rows, queries = near_tie_rows(SELECT_BLOCK * (MAX_LOOK_BLOCKS + 8), 6)
    backend = BF16ScanBackend.create(D)
    backend.add(rows)
    result = search_exact(backend, rows, queries, 5, need=Exactness.TOP1)
    scores, ids = exact_topk(rows, queries, 5)
    assert not result.certified.any() and result.fell_back.all()  # the certificate refuses what it cannot know
    assert np.array_equal(result.ids, ids) and np.array_equal(result.scores, scores)
    kept = search_exact(backend, rows, queries, 5, fallback=False, need=Exactness.TOP1)
    assert not kept.fell_back.any() and not kept.exact.any()  # without fallback: flagged, not passed off as exact


def test_separated_rows_are_certified_without_brute_force():
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((2000, D))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    queries = (rows[:32] * 0.4 + rng.standard_normal((32, D)) / np.sqrt(D) * 0.9).astype(np.float32)
    backend = get_backend("bf16").create(D)  # through the registry, as build-index finds it
    backend.add(rows)
    result = search_exact(backend, rows, queries, 5, need=Exactness.TOP1)
    scores, ids = exact_topk(rows, queries, 5)
    assert result.certified.all() and not result.fell_back.any()
    assert np.array_equal(result.ids[:, 0], ids[:, 0]) and np.array_equal(result.scores[:, 0], scores[:, 0])


def test_a_kernel_accumulating_in_bf16_is_refused():
    assert keeps_the_bound(torch.matmul)  # this machine's torch: float32 accumulation

    def bf16_accumulation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.bfloat16)
        for lo in range(0, a.shape[1], 64):  # products in float32, every partial sum rounded to bf16
            for i in range(lo, lo + 64):
                acc = (acc.float() + a[:, i:i + 1].float() * b[i:i + 1, :].float()).to(torch.bfloat16)
        return acc
    assert not keeps_the_bound(bf16_accumulation)


def test_saved_and_loaded_it_answers_alike_and_a_foreign_file_is_refused(tmp_path):
    rng = np.random.default_rng(9)
    rows = rng.standard_normal((300, D)).astype(np.float32)
    backend = BF16ScanBackend.create(D)
    backend.add(rows)
    path = tmp_path / "template_00.bf16.npz"
    backend.save(path)
    again = BF16ScanBackend.load(path)
    assert again.ntotal == 300 and again.max_norm == backend.max_norm
    q = rows[:4]
    for a, b in zip(backend.search_candidates(q, 8).__dict__.values(), again.search_candidates(q, 8).__dict__.values()):
        assert np.array_equal(a, b)
    bad = tmp_path / "bad.bf16.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(VectorFormatError, match="is not a bf16 index"):
        BF16ScanBackend.load(bad)
    with pytest.raises(VectorFormatError, match="takes no search parameters"):
        backend.search(q, 3, {"nprobe": 4})


def test_the_second_look_certifies_what_the_candidates_could_not():
    """100 rows just under the best one fill the 16 candidates, so their bound (their score plus ~0.005) cannot
    certify; the second look scores the blocks whose maxima reach the best score exactly (from the same scan)
    and certifies without brute force."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal(D)
    q /= np.linalg.norm(q)

    def at_cosine(cos: np.ndarray) -> np.ndarray:
        o = rng.standard_normal((len(cos), D))
        o -= np.outer(o @ q, q)
        o /= np.linalg.norm(o, axis=1, keepdims=True)
        return cos[:, None] * q + np.sqrt(1 - cos[:, None] ** 2) * o

    rows = np.concatenate([at_cosine(np.array([0.5])), at_cosine(np.full(100, 0.499)),
                           at_cosine(rng.uniform(0.0, 0.1, 3000))]).astype(np.float32)
    backend = BF16ScanBackend.create(D)
    backend.add(rows)
    first = backend.search_candidates(q[None].astype(np.float32), 1 + BF16ScanBackend.extra_candidates)
    assert first.bound[0] >= 0.5  # the first look alone could not certify the best row
    result = search_exact(backend, rows, q[None].astype(np.float32), 1, need=Exactness.TOP1)
    assert result.certified.all() and not result.fell_back.any() and result.ids[0, 0] == 0


@pytest.mark.parametrize("n, k", [(5000, 16), (5000, 39), (5000, 40), (100, 16), (128 * 20, 19), (130, 200)])
def test_top_k_through_block_maxima_equals_a_full_top_k(n, k):
    """Selection by block maxima (whole blocks, a short last block, too few blocks, k > n) gives the values a
    full top-k gives and ids that hold them, and the block maxima are those of the scores."""
    from idia_engine.indexes.bf16 import _chunk_topk

    g = torch.Generator().manual_seed(n + k)
    queries = torch.randn((12, 64), generator=g).to(torch.bfloat16)
    rows = torch.randn((n, 64), generator=g).to(torch.bfloat16)
    v, ids, block_max = _chunk_topk(queries.T, rows, k)
    scores = (rows @ queries.T).T.float()  # the same product as the scan's (n < SUB_CHUNK: one matmul)
    full_v, _ = scores.topk(min(k, n), dim=1)
    assert torch.equal(v, full_v)
    assert torch.equal(scores.gather(1, ids), v) and all(len(set(r.tolist())) == min(k, n) for r in ids)
    padded = torch.full((12, len(block_max) * SELECT_BLOCK), -torch.inf)
    padded[:, :n] = scores
    assert torch.equal(block_max.float().T, padded.view(12, -1, SELECT_BLOCK).amax(2))
