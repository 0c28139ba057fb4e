"""float32 rows as bf16 rows plus int16 low halves (`indexes.split_rows`): the join is exact for every finite
float32, the rows read back as the array they stand for, and a built bf16 index keeps no float32 copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from idia_engine.engine.errors import ArtifactError
from idia_engine.indexes import VectorFormatError, template_file, vectors_file
from idia_engine.indexes.bf16 import BF16ScanBackend
from idia_engine.indexes.exact import exact_topk
from idia_engine.indexes.split_rows import (
    SplitRows,
    join_float32,
    low_file,
    npz_member,
    round_to_bf16,
    split_float32,
    write_low_halves,
)
from idia_engine.indexes.vectors import read_rows


def _bits(values: list[int]) -> np.ndarray:
    return np.array(values, np.uint32).view(np.float32)


# Patterns at the edges of the rounding: exact ties (low half 0x8000) rounding up and down in magnitude, one
# below and above a tie, the last float below a power of two (rounds up across the exponent), signed zeros,
# the smallest subnormals, the largest finite float32 whose rounding stays finite.
EDGES = _bits([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F807FFF, 0x3F808001, 0x3F7FFFFF, 0xBF7FFFFF,
               0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x00008000, 0x80008000, 0x7F7F7FFF, 0xFF7F7FFF])


def _split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    high = round_to_bf16(torch.from_numpy(np.ascontiguousarray(x))).view(torch.int16).numpy()
    return high, split_float32(x, high)


def test_the_join_gives_back_every_bit_at_the_rounding_edges():
    high, low = _split(EDGES.reshape(2, -1))
    np.testing.assert_array_equal(join_float32(high, low).view(np.uint32), EDGES.reshape(2, -1).view(np.uint32))
    # ties go away from zero, in magnitude, for both signs; otherwise the rounding is torch's (to nearest)
    up = (high.astype(np.int32) << 16).view(np.float32).ravel()
    assert up[0] == _bits([0x3F810000])[0] and up[2] == _bits([0xBF810000])[0]
    assert up[1] == _bits([0x3F820000])[0] and up[3] == _bits([0xBF820000])[0]
    not_ties = (EDGES.view(np.uint32) & 0xFFFF) != 0x8000
    np.testing.assert_array_equal(up[not_ties], torch.from_numpy(EDGES[not_ties]).to(torch.bfloat16).float().numpy())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2 ** 32 - 1), min_size=1, max_size=64))
def test_the_join_is_exact_for_any_finite_float32(patterns):
    x = _bits(patterns)
    x = x[np.isfinite(x) & (np.abs(x) <= _bits([0x7F7F7FFF])[0])].reshape(1, -1)  # rounding stays finite
    if not x.size:
        return
    high, low = _split(x)
    np.testing.assert_array_equal(join_float32(high, low).view(np.uint32), x.view(np.uint32))


def test_a_high_half_that_is_not_the_nearest_rounding_is_refused():
    x = np.full((1, 4), 1.0 + 2 ** -9, np.float32)  # its nearest bf16 is 1.0
    high = round_to_bf16(torch.from_numpy(x)).view(torch.int16).numpy()
    with pytest.raises(VectorFormatError, match="not the nearest-ties-away rounding"):
        split_float32(x, high - 2)  # two bf16 steps below: the remainder needs more than 16 bits


@pytest.fixture()
def stored(tmp_path):
    """A bf16 index file and the low halves of structured rows (names sharing parts: close rows)."""
    rng = np.random.default_rng(4)
    parts = rng.standard_normal((40, 48))
    rows = parts[rng.integers(0, 40, 700)] + 0.3 * parts[rng.integers(0, 40, 700)]
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    backend = BF16ScanBackend.create(48)
    backend.add(rows)
    backend.save(tmp_path / template_file(0, BF16ScanBackend.file_suffix))
    np.save(tmp_path / vectors_file(0), rows)
    write_low_halves(np.load(tmp_path / vectors_file(0), mmap_mode="r"),
                     tmp_path / template_file(0, BF16ScanBackend.file_suffix), tmp_path / low_file(0))
    return rows, tmp_path


def test_split_rows_read_as_the_float32_array(stored):
    rows, folder = stored
    split = SplitRows(folder / template_file(0, BF16ScanBackend.file_suffix), folder / low_file(0))
    assert split.shape == rows.shape and len(split) == len(rows) and split.dtype == np.float32 and split.ndim == 2
    ids = np.array([5, 6, 7, 699, 0, 5, -1, 300])
    for key in (slice(None), slice(10, 20), slice(690, 800), slice(3, 40, 7), ids, ids.reshape(2, 4), 17, -3,
                np.arange(700) % 3 == 0, (ids, slice(2, 9))):
        np.testing.assert_array_equal(split[key], rows[key], err_msg=str(key))
    np.testing.assert_array_equal(read_rows(split, ids), rows[ids])
    np.testing.assert_array_equal(read_rows(split, slice(100, 150)), rows[100:150])
    np.testing.assert_array_equal(np.asarray(split), rows)
    with pytest.raises(IndexError, match="row 700 is out of range"):
        split[np.array([1, 700])]
    # the exact paths take them as rows: brute force over them is brute force over the float32 array
    q = rows[[3, 400]] + 0.01
    for got, want in zip(exact_topk(split, q, 5), exact_topk(rows, q, 5)):
        np.testing.assert_array_equal(got, want)


def test_the_low_halves_are_checked_against_the_bf16_file_they_complete(stored, tmp_path):
    rows, folder = stored
    other = rows.copy()
    other[10] = -other[10]  # another row 10: its bf16 rounding is not the file's
    with pytest.raises(VectorFormatError, match="nearest-ties-away rounding"):
        write_low_halves(other, folder / template_file(0, BF16ScanBackend.file_suffix), tmp_path / "x.low.npy")
    assert not list(tmp_path.glob("*x.low.npy*"))  # nothing half-written left behind
    with pytest.raises(VectorFormatError, match=r"holds rows int16 \(700, 48\), expected int16 \(699, 48\)"):
        write_low_halves(rows[:-1], folder / template_file(0, BF16ScanBackend.file_suffix), tmp_path / "x.low.npy")


def test_a_missing_or_foreign_half_is_one_clear_error(stored):
    rows, folder = stored
    (folder / vectors_file(0)).unlink()
    np.testing.assert_array_equal(BF16ScanBackend.raw_rows(folder, 0)[:], rows)
    np.save(folder / low_file(0), np.zeros((699, 48), np.int16))
    with pytest.raises(VectorFormatError, match=r"vectors_00.low.npy holds int16 \(699, 48\), expected int16 "
                                                r"\(700, 48\) like .*template_00.bf16.npz"):
        BF16ScanBackend.raw_rows(folder, 0)
    (folder / low_file(0)).unlink()
    with pytest.raises(ArtifactError, match=r"vectors_00.low.npy is missing: index kind bf16 keeps the float32 rows "
                                            r"of template 0 as the bf16 rows plus these low halves; rebuild"):
        BF16ScanBackend.raw_rows(folder, 0)
    (folder / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(VectorFormatError, match=r"junk.npz is not a readable .npz archive with array rows"):
        npz_member(folder / "junk.npz", "rows")


def test_an_index_built_before_the_split_still_reads_its_float32_file(stored):
    rows, folder = stored
    (folder / low_file(0)).unlink()  # what older builds wrote: the bf16 file and the float32 vectors file
    got = BF16ScanBackend.raw_rows(folder, 0)
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, rows)


def test_a_loaded_bf16_index_rescores_its_own_split_rows_reading_only_the_low_halves(stored, monkeypatch):
    """search_exact over a loaded bf16 index and its template's split rows takes the bf16 half from the index
    in memory (same answers as over the float32 array); rows of another file are read whole from disk."""
    from idia_engine.indexes import split_rows as split_module
    from idia_engine.indexes.exact import Exactness, search_exact

    rows, folder = stored
    high_file = folder / template_file(0, BF16ScanBackend.file_suffix)
    split = SplitRows(high_file, folder / low_file(0))
    backend = BF16ScanBackend.load(high_file)
    read: list[str] = []
    real = split_module.pread_rows
    monkeypatch.setattr(split_module, "pread_rows", lambda path, *a: read.append(Path(path).name) or real(path, *a))
    q = rows[[3, 400, 650]] + 0.02 * rows[[4, 401, 651]]
    want = search_exact(backend, rows, q, 5, fallback=True, need=Exactness.TOPK)
    got = search_exact(backend, split, q, 5, fallback=True, need=Exactness.TOPK)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert read and set(read) == {low_file(0)}
    read.clear()
    in_memory = BF16ScanBackend.create(48)  # the same rows, not loaded from that file: no shortcut
    in_memory.add(rows)
    got = search_exact(in_memory, split, q, 5, fallback=True, need=Exactness.TOPK)
    np.testing.assert_array_equal(got.ids, want.ids)
    assert high_file.name in read
    with pytest.raises(VectorFormatError, match="needs int16"):
        split.with_high_rows(np.zeros((700, 48), np.float32))
