"""Peak memory of searching a built index at 10^6 names, through the engine's own search and cell settling.

Builds an index with `build_memory`'s stand-in text encoder (the real `build_index`, any `--index` kind),
then runs what `query` runs after embedding the photos: `search_all` (the kind's searchers) and, for kinds
that are not exact by themselves, `settle_cells` (witnesses, then the kind's resolver per template), over
structured photo embeddings: members' photos sit near their true name's rows (cosine ~0.6 with the name's
mean), non-members' are near random names' means only weakly. RSS is sampled every 50 ms (anonymous memory
and the pages of memory-mapped index files this process touched, so reading a 43 GB float32 template set
through memmaps would show).

    python -m idia_engine.benchmarks.search_memory --names 1000000 --templates 4 --dim 512 \
        --index ensemble-bf16 --out DIR

Prints and writes (DIR/search_memory.json) a JSON line: build and search seconds, peak RSS of each phase,
bytes on disk, what the search certified, and the machine; with --check, also float32 brute force over the
same stored rows afterwards (its seconds; exact top-1s, decisions, scores and modes equal or not).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from idia_engine.engine.candidates.templates import PAPER_TEMPLATES
from idia_engine.engine.index.build import BuildConfig, build_index
from idia_engine.engine.index.reader import open_index
from idia_engine.engine.progress import no_progress
from idia_engine.engine.query.cells import EXACT_STATUSES
from idia_engine.engine.query.search import SearchJob, search_all, status_counts
from idia_engine.engine.query.settle import settle_cells
from idia_engine.engine.query.votes import paper_mode_votes
from idia_engine.indexes import vectors_file
from idia_engine.indexes.exact import exact_topk
from idia_engine.indexes.hardware import cpu_bf16_native

from .build_memory import PeakRss, StandInTextModel, _stand_in_info, write_names
from .run import machine_info


@dataclass(frozen=True)
class ArrayEmbeddings:
    """Photo embeddings held in memory (the `QueryEmbeddings` a search reads)."""

    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def chunks(self, size: int):
        for start in range(0, len(self.rows), size):
            yield start, self.rows[start:start + size]


def photos(index_dir: Path, persons: int, per_person: int, member_fraction: float, seed: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings float32 [P * per_person, D], person [M], true ids [P]) over the built index's rows."""
    index = open_index(index_dir)
    rng = np.random.default_rng(seed)
    n, t_count = len(index.names), index.num_templates
    true = rng.choice(n, persons, replace=False)
    members = rng.random(persons) < member_fraction
    dim = index.manifest.embedding_dim
    out = np.empty((persons * per_person, dim), np.float32)
    for p in range(persons):
        mean = np.mean([index.vectors(t)[true[p]] for t in range(t_count)], axis=0)
        weight = 0.6 if members[p] else 0.15  # members' photos sit close to their name
        noise = rng.standard_normal((per_person, dim)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        x = weight * mean / np.linalg.norm(mean) + np.sqrt(1 - weight ** 2) * noise
        out[p * per_person:(p + 1) * per_person] = x / np.linalg.norm(x, axis=1, keepdims=True)
    index.close()
    return out, np.repeat(np.arange(persons), per_person), true.astype(np.int64)


def search(index_dir: Path, q: np.ndarray, person: np.ndarray, true: np.ndarray, k: int
           ) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """What query's stage 4 does: the kind's searchers, then cells where the kind is not exact by itself.
    Returns (stats, ids int32 [M, T, k], scores float32 [M, T, k], status int8 [M, T])."""
    index = open_index(index_dir)
    m, t_count = len(q), index.num_templates
    ids = np.zeros((m, t_count, k), np.int32)
    scores = np.zeros((m, t_count, k), np.float32)
    status = np.zeros((m, t_count), np.int8)
    by_cells = not index.kind.exact_search
    job = SearchJob(index=index, images=ArrayEmbeddings(q), extra_emb=None, k=k, use_gpu=False, chunk=4096,
                    search_params=None, fallback=not by_cells)
    stats = search_all(job, ids, scores, status, no_progress)
    if by_cells:
        stats["cells"] = settle_cells(job, person, true, ids, scores, status, no_progress)
        stats.update(status_counts(status))
    index.close()
    return stats, ids, scores, status


def check(index_dir: Path, q: np.ndarray, person: np.ndarray, true: np.ndarray, ids: np.ndarray,
          scores: np.ndarray, status: np.ndarray) -> dict:
    """The search beside float32 brute force over the same stored rows (`exact_topk`, template by template):
    its seconds, and whether every top-1 the search calls exact, and every person's paper-mode decision, score
    and per-template mode, equal brute force's. Witnessed top-1s are not exact by design (a name proved to
    rank above the true one), so only the decisions they feed are compared."""
    index = open_index(index_dir)
    ref_ids = np.empty(status.shape, np.int64)
    ref_scores = np.empty(status.shape, np.float32)
    start = time.perf_counter()
    for t in range(index.num_templates):
        s, i = exact_topk(index.vectors(t), q, 1)
        ref_scores[:, t], ref_ids[:, t] = s[:, 0], i[:, 0]
    brute_s = time.perf_counter() - start
    index.close()
    exact = np.isin(status, EXACT_STATUSES)
    top1 = ids[:, :, 0].astype(np.int64)
    a, b = paper_mode_votes(top1, person, true), paper_mode_votes(ref_ids, person, true)
    return {"brute_force_s": round(brute_s, 1),
            "brute_force": "float32 exact_topk over the stored rows, one template at a time",
            "exact_top1s": int(exact.sum()),
            "exact_top1s_equal": bool(np.array_equal(top1[exact], ref_ids[exact])
                                      and np.array_equal(scores[:, :, 0][exact], ref_scores[exact])),
            "decisions_equal": bool(np.array_equal(a.decisions(1), b.decisions(1))),
            "scores_equal": bool(np.array_equal(a.scores, b.scores)),
            "modes_equal": bool(np.array_equal(a.modes, b.modes))}


def float32_baseline(index_dir: Path, q: np.ndarray, person: np.ndarray, true: np.ndarray, k: int,
                     found: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict:
    """The search again, back to back: once as built (bf16 kinds: rows joined from the bf16 rows and the low
    halves), then with each template's joined rows written as a float32 vectors_XX.npy into the data
    directory (the layout of bf16 builds before the split, which the kind reads first), which is removed
    afterwards. Both answers must equal the first search's."""
    def timed() -> float:
        start = time.perf_counter()
        _, ids, scores, status = search(index_dir, q, person, true, k)
        if not all(np.array_equal(a, b) for a, b in zip((ids, scores, status), found)):
            raise AssertionError("the search answered differently the second time")
        return round(time.perf_counter() - start, 4)

    as_built = timed()
    index = open_index(index_dir)
    written = [index.data_dir / vectors_file(t) for t in range(index.num_templates)]
    try:
        for t, path in enumerate(written):
            rows = index.vectors(t)
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=rows.shape)
            for r0 in range(0, len(rows), 1 << 16):
                out[r0:r0 + (1 << 16)] = rows[r0:r0 + (1 << 16)]
            out.flush()
            del out
        index.close()
        return {"search_s_as_built": as_built, "search_s_float32_files": timed(), "answers_identical": True}
    finally:
        index.close()
        for path in written:
            path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=1_000_000)
    parser.add_argument("--templates", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--index", default="ensemble-bf16")
    parser.add_argument("--persons", type=int, default=10)
    parser.add_argument("--photos", type=int, default=30, help="photos per person")
    parser.add_argument("--member-fraction", type=float, default=0.5)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--float32-baseline", action="store_true",
                        help="afterwards, time the search again with float32 vectors files (bf16 kinds; needs "
                        "their disk space) against the bf16 rows plus low halves")
    parser.add_argument("--check", action="store_true",
                        help="afterwards, brute-force every template's exact top-1 and compare (not in the RSS)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    names_file = write_names(args.out, args.names)
    index_dir = args.out / "index"
    config = BuildConfig(names_file=names_file, index_dir=index_dir, templates=PAPER_TEMPLATES[:args.templates],
                         index_kind=args.index, batch_size=args.batch_size, overwrite=True)
    start = time.perf_counter()
    with PeakRss() as build_rss:
        manifest = build_index(config, model=StandInTextModel(_stand_in_info(args.dim)))
    build_s = time.perf_counter() - start
    q, person, true = photos(index_dir, args.persons, args.photos, args.member_fraction, seed=0)
    start = time.perf_counter()
    base = psutil.Process().memory_info().rss
    with PeakRss() as search_rss:
        stats, ids, scores, status = search(index_dir, q, person, true, args.top_k)
    search_s = time.perf_counter() - start
    result = {"names": manifest.num_names, "templates": manifest.num_templates, "dim": args.dim,
              "index_kind": manifest.index_kind, "cpu_bf16_native": cpu_bf16_native(),
              "photos": len(q), "persons": len(true), "member_fraction": args.member_fraction,
              "build_s": round(build_s, 1), "build_peak_rss_gib": round(build_rss.peak / 2 ** 30, 2),
              "search_s": round(search_s, 1), "search_peak_rss_gib": round(search_rss.peak / 2 ** 30, 2),
              "rss_before_search_gib": round(base / 2 ** 30, 2),
              "bytes_on_disk": sum(manifest.files.values()),
              "float32_vectors_files": sum(1 for f in manifest.files if f.endswith(".npy") and
                                           f.startswith("vectors_") and not f.endswith(".low.npy")),
              "search": stats, "machine": machine_info()}
    if args.check:
        result["check"] = check(index_dir, q, person, true, ids, scores, status)
    if args.float32_baseline:
        result["float32_baseline"] = float32_baseline(index_dir, q, person, true, args.top_k, (ids, scores, status))
    (args.out / "search_memory.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(json.dumps({key: value for key, value in result.items() if key not in ("search", "machine")}))


if __name__ == "__main__":
    main()
