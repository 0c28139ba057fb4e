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
bytes on disk, what the search certified, and the machine.
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
from idia_engine.engine.query.search import SearchJob, search_all, status_counts
from idia_engine.engine.query.settle import settle_cells
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


def search(index_dir: Path, q: np.ndarray, person: np.ndarray, true: np.ndarray, k: int) -> dict:
    """What query's stage 4 does: the kind's searchers, then cells where the kind is not exact by itself."""
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
    return stats


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
        stats = search(index_dir, q, person, true, args.top_k)
    search_s = time.perf_counter() - start
    result = {"names": manifest.num_names, "templates": manifest.num_templates, "dim": args.dim,
              "index_kind": manifest.index_kind, "cpu_bf16_native": cpu_bf16_native(),
              "photos": len(q), "persons": len(true), "member_fraction": args.member_fraction,
              "build_s": round(build_s, 1), "build_peak_rss_gib": round(build_rss.peak / 2 ** 30, 2),
              "search_s": round(search_s, 1), "search_peak_rss_gib": round(search_rss.peak / 2 ** 30, 2),
              "rss_before_search_gib": round(base / 2 ** 30, 2),
              "bytes_on_disk": sum(manifest.files.values()), "search": stats, "machine": machine_info()}
    (args.out / "search_memory.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(json.dumps({key: value for key, value in result.items() if key not in ("search", "machine")}))


if __name__ == "__main__":
    main()
