"""faiss on GPUs: how many there are, replicas of a flat index, and per-device clones of any other index.

`faiss_gpu_count` is the one place the GPU count is read; every caller looks it up here at call time, so
tests patch "idia_engine.indexes.gpu.faiss_gpu_count" to simulate a machine with or without GPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import faiss
import numpy as np

log = logging.getLogger(__name__)

GPU_MAX_K = 2048  # faiss GPU k-selection limit (k and nprobe)


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for CPU-only builds or machines without a GPU)."""
    # CPU-only faiss builds have no get_num_gpus: this asks the library, not a backend.
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def replicate_to_gpus(index: faiss.Index, use_gpu: bool) -> tuple[faiss.Index, bool]:
    """Replicate `index` on all GPUs if asked and possible; otherwise keep it on the CPU (with a log line)."""
    if not use_gpu:
        return index, False
    if faiss_gpu_count() == 0:
        log.warning("GPU search asked for, but faiss sees no GPU: searching on the CPU")
        return index, False
    return faiss.index_cpu_to_all_gpus(index), True


# Mutable: filled device by device while cloning.
@dataclass
class GpuCopy:
    """Per-device clones of the CPU index (queries are split across them; each call gets its own params).

    faiss's IndexReplicas (index_cpu_to_all_gpus) rejects per-call SearchParameters and has no
    search_preassigned, so the replicas are kept as a list of single-device indexes instead."""

    resources: list = field(default_factory=list)  # StandardGpuResources, one per device (kept alive)
    indexes: list = field(default_factory=list)  # one GPU index per device
    float16_storage: bool = False  # flat storage in float16 (GpuClonerOptions.useFloat16)
    float16_luts: bool = False  # IVFPQ lookup tables in float16


def clone_to_gpus(index: faiss.Index, *, is_flat: bool, is_pq: bool, float16_flat: bool) -> GpuCopy:
    """One clone per GPU. is_flat: a flat index (float16 storage if float16_flat); is_pq: an IVFPQ index,
    which falls back to float16 lookup tables when its codes are too large for float32 ones."""
    copy = GpuCopy()
    for dev in range(faiss_gpu_count()):
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = bool(float16_flat and is_flat)
        co.allowCpuCoarseQuantizer = True  # e.g. an HNSW coarse quantizer: lists are chosen by us anyway
        co.use_cuvs = False  # the classic kernels implement search_preassigned
        try:
            gpu = faiss.index_cpu_to_gpu(res, dev, index, co)
        except RuntimeError:
            if not is_pq:
                raise
            co.useFloat16 = True  # large PQ codes need float16 lookup tables (shared memory)
            gpu = faiss.index_cpu_to_gpu(res, dev, index, co)
            copy.float16_luts = True
        copy.resources.append(res)
        copy.indexes.append(gpu)
    copy.float16_storage = bool(float16_flat and is_flat)
    return copy


def split_over_gpus(gpus: list, q: np.ndarray, fn: Callable[[faiss.Index, slice], tuple[np.ndarray, np.ndarray]]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Run fn(index, rows) on contiguous query slices, one per GPU, and stack the results."""
    if len(gpus) == 1 or len(q) < 2 * len(gpus):
        return fn(gpus[0], slice(0, len(q)))
    step = -(-len(q) // len(gpus))
    slices = [slice(i, min(i + step, len(q))) for i in range(0, len(q), step)]
    with ThreadPoolExecutor(len(slices)) as pool:  # faiss releases the GIL
        parts = list(pool.map(lambda a: fn(*a), zip(gpus, slices)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
