"""Counting pieces of caption files: in worker processes of this machine, or on a Ray cluster.

Both run the same `count_piece` over the same pieces (captions.py) with the same matcher, and a file's
count is the sum of its pieces' counts, so the result does not depend on how the work was split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np

from ..ray_cluster import ray_connection
from .captions import Piece, iter_batches
from .matcher import NameMatcher


@dataclass
class PieceCount:
    """What one piece holds."""

    counts: np.ndarray  # int64 [names]: captions of the piece containing each name
    rows: int  # captions read
    empty: int  # null or empty captions
    invalid_utf8: int  # captions with bytes that are not UTF-8 (decoded with U+FFFD)


def count_piece(piece: Piece, matcher: NameMatcher, batch_rows: int) -> PieceCount:
    counts = np.zeros(len(matcher.names), np.int64)
    rows = empty = invalid = 0
    for captions, bad in iter_batches(piece, batch_rows):
        r, e = matcher.count(captions, counts)
        rows, empty, invalid = rows + r, empty + e, invalid + bad
    return PieceCount(counts, rows, empty, invalid)


# ----------------------------------------------------------------------------------------------------
# This machine: a pool of processes, each with its own matcher
# ----------------------------------------------------------------------------------------------------

_WORKER_MATCHER: NameMatcher | None = None


def _init_worker(names: list[str], case_sensitive: bool) -> None:
    global _WORKER_MATCHER
    _WORKER_MATCHER = NameMatcher(names, case_sensitive)


def _count_in_worker(piece: Piece, batch_rows: int) -> PieceCount:
    return count_piece(piece, _WORKER_MATCHER, batch_rows)


def count_locally(pieces: list[Piece], names: list[str], case_sensitive: bool, workers: int,
                  batch_rows: int) -> Iterator[tuple[Piece, PieceCount]]:
    """Yield each piece's count as it finishes (workers = 1: in this process, no pool)."""
    if workers <= 1 or len(pieces) <= 1:
        matcher = NameMatcher(names, case_sensitive)
        for piece in pieces:
            yield piece, count_piece(piece, matcher, batch_rows)
        return
    # spawn, not fork: the parent may hold threads (torch, Arrow) that a fork would copy mid-lock
    with ProcessPoolExecutor(max_workers=min(workers, len(pieces)), mp_context=get_context("spawn"),
                             initializer=_init_worker, initargs=(names, case_sensitive)) as pool:
        futures = {pool.submit(_count_in_worker, piece, batch_rows): piece for piece in pieces}
        for future in as_completed(futures):
            yield futures[future], future.result()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------------
# A Ray cluster: Ray Data for Parquet (blocks of row groups through map_batches), Ray tasks for text files
# ----------------------------------------------------------------------------------------------------

_RAY_MATCHERS: dict[tuple, NameMatcher] = {}
_ROWS, _EMPTY, _INVALID = -1, -2, -3  # ids of the per-batch totals in map_batches' sparse output


def _ray_matcher(names: tuple[str, ...], case_sensitive: bool) -> NameMatcher:
    """One matcher per Ray worker process and name list, built on its first batch."""
    key = (hash(names), len(names), case_sensitive)
    if key not in _RAY_MATCHERS:
        _RAY_MATCHERS.clear()
        _RAY_MATCHERS[key] = NameMatcher(list(names), case_sensitive)
    return _RAY_MATCHERS[key]


def _count_batch(batch, names: tuple[str, ...], case_sensitive: bool, column: str) -> dict:
    """map_batches: captions of one block -> sparse (id, count) rows, totals under negative ids."""
    import pyarrow as pa

    from .captions import _decode

    matcher = _ray_matcher(names, case_sensitive)
    values = batch.column(column)
    invalid = 0
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        decoded = [None if v is None else _decode(v) for v in values.to_pylist()]
        captions = [None if d is None else d[0] for d in decoded]
        invalid = sum(1 for d in decoded if d and d[1])
    else:
        captions = values.to_pylist()
    counts = np.zeros(len(names), np.int64)
    rows, empty = matcher.count(captions, counts)
    ids = np.flatnonzero(counts)
    return {"id": np.r_[ids, [_ROWS, _EMPTY, _INVALID]].astype(np.int64),
            "n": np.r_[counts[ids], [rows, empty, invalid]].astype(np.int64)}


def count_on_ray(pieces: list[Piece], names: list[str], case_sensitive: bool, address: str, workers: int,
                 batch_rows: int) -> Iterator[tuple[Piece, PieceCount]]:
    """Yield each piece's count: a Parquet file through Ray Data (read_parquet -> map_batches with the matcher
    -> per-name sums on the driver), text and TSV files as Ray tasks. Parquet pieces are whole files.
    address "local" starts a Ray instance here with `workers` CPUs (what the tests use)."""
    with ray_connection(address, workers) as ray:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        names_t = tuple(names)
        count_file_task = ray.remote(_count_piece_task)
        names_ref = ray.put(names_t)
        text_jobs = {count_file_task.remote(p, names_ref, case_sensitive, batch_rows): p
                     for p in pieces if p.file.kind != "parquet"}
        for piece in (p for p in pieces if p.file.kind == "parquet"):
            if piece.row_groups is not None:
                raise ValueError("on Ray a Parquet piece is a whole file: Ray Data splits it into blocks itself")
            ds = ray.data.read_parquet(str(piece.file.path)).select_columns([piece.file.column])
            out = ds.map_batches(_count_batch, batch_format="pyarrow", batch_size=batch_rows,
                                 fn_kwargs={"names": names_t, "case_sensitive": case_sensitive,
                                            "column": piece.file.column})
            counts = np.zeros(len(names), np.int64)
            totals = {_ROWS: 0, _EMPTY: 0, _INVALID: 0}
            for batch in out.iter_batches(batch_format="numpy", batch_size=None):
                ids, n = batch["id"], batch["n"]
                named = ids >= 0
                np.add.at(counts, ids[named], n[named])
                for key in totals:
                    totals[key] += int(n[ids == key].sum())
            yield piece, PieceCount(counts, totals[_ROWS], totals[_EMPTY], totals[_INVALID])
        pending = list(text_jobs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield text_jobs[done[0]], ray.get(done[0])


def _count_piece_task(piece: Piece, names: tuple[str, ...], case_sensitive: bool, batch_rows: int) -> PieceCount:
    return count_piece(piece, _ray_matcher(names, case_sensitive), batch_rows)
