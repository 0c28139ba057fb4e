"""`run_bench(config)`: throughput and agreement of every search method against huge synthetic label spaces.

Definitions (every figure next to its baseline, measured in the same run):
- q/s: (image query, template) pairs answered per second = Q x T / search seconds (build excluded).
- ratio_to_dense: q/s over the dense torch baseline's q/s (the paper's method: matmul + top-k per template).
- exact reference: FAISS flat (float32 sgemm, ties to the lower id); dense's agreement with it is reported too.
- top1_agreement (= recall@1, since every method returns k=1): fraction of (query, template) pairs whose
  predicted name equals the exact one.
- decision_agreement: fraction of persons whose paper-mode decision (score >= tau, tau = 1) equals the exact
  one; score_agreement: fraction of persons whose score 0..T is identical.
- ensemble methods fetch candidate rows from the generator (in the engine: read from the vectors files); the time spent
  regenerating rows is measured and excluded from q/s (reported as fetch_s), the build likewise.

Label spaces are streamed one template at a time (per-template methods are interleaved on the same rows, so
machine load hits them alike); 10^6 x 21 x 512 never exists at once.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from idia_engine.engine.disk.versions import library_versions, utc_now
from idia_engine.engine.errors import InputError
from idia_engine.engine.query.cells import BY_WITNESSES, decide_cells
from idia_engine.engine.query.votes import paper_mode_votes
from idia_engine.indexes import get_backend
from idia_engine.indexes.choice import estimate_index_bytes, ivf_nlist
from idia_engine.indexes.ensemble import TemplateEnsemble
from idia_engine.indexes.ensemble_bf16 import DEFAULT_CANDIDATES as ENSEMBLE_BF16_CANDIDATES
from idia_engine.indexes.ensemble_bf16 import bf16_scans_pay
from idia_engine.indexes.exact import Exactness, exact_scores, exact_topk, max_row_norm, search_exact
from idia_engine.indexes.gpu import faiss_gpu_count

from .synthetic import SyntheticConfig, SyntheticNames

log = logging.getLogger(__name__)

# method -> (kind, description). "template" methods build one index per template on the streamed rows.
METHODS: dict[str, str] = {
    "dense": "dense torch matmul + top-k per template (the paper's method, the baseline)",
    "flat": "exact FAISS IndexFlatIP per template",
    "ivf-flat": "IVF-Flat, raw approximate top-1",
    "ivf-flat+rerank": "IVF-Flat candidates (k'=64) re-ranked exactly, no fallback",
    "ivf-sq8": "IVF-SQ8, raw approximate top-1",
    "ivf-pq": "IVF-PQ (D/8 bytes), raw approximate top-1",
    "hnsw": "HNSW32,Flat (efSearch 64), raw approximate top-1",
    "bf16-exact": "bf16 full scan, certified re-rank against the float32 rows, brute-force fallback (exact)",
    "ensemble": "template-ensemble prefilter (K'=256), no fallback (approximate)",
    "ensemble-exact": "template-ensemble prefilter with brute-force fallback (exact)",
    "ensemble-bf16": "--index ensemble-bf16 --no-fallback: the ensemble prefilter (K' as ensemble) with stage 1 as a "
                     "certified bf16 scan of the means, no fallback (approximate; flat stage 1 where the CPU has "
                     "no native bf16)",
    "cells": "template-ensemble prefilter, cells settled by witnesses, batched brute force for the rest (exact)",
    "cells-bf16": "--index ensemble-bf16: cells as above, stage 1 and the open photos through certified bf16 "
                  "scans (exact; float32 where the CPU has no native bf16)",
    "flat-gpu": "exact FAISS flat on the GPU",
    "dense-gpu": "dense torch matmul + top-k on the GPU",
}
# ivf-pq is opt-in (--methods): training 64 sub-quantizers per template dominates a short CPU run.
DEFAULT_METHODS = ("dense", "flat", "ivf-flat", "ivf-flat+rerank", "ivf-sq8", "hnsw", "bf16-exact", "ensemble",
                   "ensemble-exact", "ensemble-bf16", "cells", "cells-bf16", "flat-gpu", "dense-gpu")
_TEMPLATE_METHODS = ("dense", "flat", "ivf-flat", "ivf-flat+rerank", "ivf-sq8", "ivf-pq", "hnsw", "bf16-exact",
                     "flat-gpu", "dense-gpu")
_IVF_FACTORIES = {"ivf-flat": "Flat", "ivf-flat+rerank": "Flat", "ivf-sq8": "SQ8", "ivf-pq": "PQ"}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Sizes are numbers of candidate names; every size gets all templates."""

    sizes: tuple[int, ...] = (1_000, 10_000, 100_000)  # label-space sizes N
    dim: int = 512  # embedding dimension D
    templates: int = 21  # T prompt templates
    persons: int = 20  # persons at N <= 10^4 (images_per_person queries each)
    persons_large: int = 10  # persons at N > 10^4 (fewer queries: dense search of 10^5+ names is slow here)
    images_per_person: int = 30  # images per person (the paper's n = 30)
    methods: tuple[str, ...] = DEFAULT_METHODS  # method names (METHODS)
    device: str = "auto"  # auto | cpu | cuda: where the GPU methods may run
    seed: int = 0  # generator seed
    candidates: int = 256  # K' of the ensemble prefilter
    cell_candidates: int = 32  # K' of the prefilter of "cells" (a witness only has to beat the true name)
    approx_max_names: int = 10_000  # FAISS IVF variants only up to this N (21 indexes to train and fill)
    hnsw_max_names: int = 1_000  # HNSW only up to this N (its graph build dominates on a 2-core CPU)
    text_encoder_prompts: int = 512  # prompts for the text-encoder benchmark (0: skip it)
    member_fraction: float = 1.0  # share of persons the synthetic model knows (the rest are non-members)
    out: Path = Path("benchmarks/results/latest")  # output folder
    name: str = ""  # label stored in the results

    def __post_init__(self) -> None:
        """Every option checked when the config is made (also by dataclasses.replace); InputError names it."""
        if not self.sizes or any(n < 10 for n in self.sizes):
            raise InputError(f"--size must be >= 10 names, got {list(self.sizes)}")
        if self.dim < 16:
            raise InputError(f"--dim must be >= 16, got {self.dim}")
        for flag, value in (("--persons", self.persons), ("--persons", self.persons_large),
                            ("images per person", self.images_per_person), ("--candidates", self.candidates),
                            ("cell candidates", self.cell_candidates)):
            if value < 1:
                raise InputError(f"{flag} must be >= 1, got {value}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise InputError(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
        if not 0.0 <= self.member_fraction <= 1.0:
            raise InputError(f"--member-fraction must lie in 0..1, got {self.member_fraction}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"--device must be auto, cpu or cuda, got {self.device!r}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


QUICK = {"sizes": (500,), "dim": 64, "templates": 5, "persons": 6, "persons_large": 6, "images_per_person": 5,
         "text_encoder_prompts": 0, "hnsw_max_names": 1_000, "candidates": 64}


def machine_info() -> dict[str, Any]:
    import psutil
    import torch
    from idia_engine.engine.model.text_encoder import bf16_supported

    cpu = platform.processor()
    flags: set[str] = set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), flags)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    features = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16") if f in flags]
    return {"host": platform.node(), "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / 2 ** 30, 1), "gpu": gpu,
            "faiss_gpus": faiss_gpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_features": " ".join(features) or "unknown", "bf16_native_cpu": bf16_supported("cpu")}


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 30


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


class _TimedSource:
    """A row source that accumulates the seconds spent producing rows (excluded from search time)."""

    def __init__(self, gen: SyntheticNames):
        self.gen, self.seconds = gen, 0.0

    def __call__(self, t: int, ids: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        rows = self.gen.rows(t, ids)
        self.seconds += time.perf_counter() - start
        return rows


def _gpu_available(device: str) -> tuple[bool, str]:
    import torch

    if device == "cpu":
        return False, "--device cpu"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA GPU"
    return True, ""


def _faiss_gpu_reason() -> str:
    return "" if faiss_gpu_count() > 0 else "faiss sees no GPU"


class _PerTemplate:
    """One per-template method: builds its index on template t's rows, answers the queries, keeps top-1."""

    def __init__(self, method: str, n: int, dim: int, q: np.ndarray, templates: int, use_gpu: bool):
        self.method, self.n, self.dim, self.q, self.use_gpu = method, n, dim, q, use_gpu
        self.top1 = np.full((len(q), templates), -1, np.int64)
        self.build_s = self.search_s = 0.0
        self.index_bytes = 0
        self.certified = self.fell_back = 0
        self.rss_gb = 0.0

    def _factory(self) -> tuple[str, dict[str, Any], int]:
        nlist = ivf_nlist(self.n)
        codec = _IVF_FACTORIES[self.method]
        if codec == "PQ":
            codec = f"PQ{self.dim // 8}"
        nprobe = max(8, nlist // 16)
        bytes_ = estimate_index_bytes("Flat" if codec == "Flat" else codec, self.n, self.dim, nlist)
        return f"IVF{nlist},{codec}", {"nprobe": nprobe}, bytes_

    def run(self, t: int, rows: np.ndarray) -> None:
        m = self.method
        start = time.perf_counter()
        params: dict[str, Any] = {}
        if m in ("dense", "dense-gpu"):
            backend = get_backend("dense").create(self.dim, use_gpu=m == "dense-gpu")
            nbytes = rows.nbytes
        elif m in ("flat", "flat-gpu"):
            backend = get_backend("flat").create(self.dim, use_gpu=m == "flat-gpu")
            nbytes = rows.nbytes
        elif m == "bf16-exact":
            backend = get_backend("bf16").create(self.dim)
            nbytes = rows.nbytes // 2  # in memory; the float32 rows it re-ranks against stay on disk (memmap)
        elif m == "hnsw":
            backend = get_backend("faiss:HNSW32,Flat").create(self.dim)
            params = {"efSearch": 64}
            nbytes = rows.nbytes + self.n * 32 * 2 * 4  # vectors + ~2 x M links of int32 per row (level 0)
        else:
            factory, params, nbytes = self._factory()
            backend = get_backend(f"faiss:{factory}").create(self.dim, use_gpu=self.use_gpu)
            rng = np.random.default_rng(t)
            sample = rows[np.sort(rng.choice(self.n, min(self.n, max(backend.recommended_train_size, 256), 10_000),
                                             replace=False))]
            backend.train(sample)
        backend.add(rows)
        self.build_s += time.perf_counter() - start
        self.index_bytes += int(nbytes)
        self.rss_gb = max(self.rss_gb, _rss_gb())
        start = time.perf_counter()
        if m == "ivf-flat+rerank":
            res = search_exact(backend, rows, self.q, 1, params, fallback=False, candidates=64, need=Exactness.TOP1)
            ids = res.ids
            self.certified += int(res.certified.sum())
        elif m == "bf16-exact":
            res = search_exact(backend, rows, self.q, 1, fallback=True, need=Exactness.TOP1)
            ids = res.ids
            self.certified += int(res.certified.sum())
            self.fell_back += int(res.fell_back.sum())
        else:
            _, ids = backend.search(self.q, 1, params or None)
        _sync()
        self.search_s += time.perf_counter() - start
        self.top1[:, t] = ids[:, 0]


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _agreement(top1: np.ndarray, ref: np.ndarray, person: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    a = paper_mode_votes(np.maximum(top1, 0), person, true)
    b = paper_mode_votes(ref, person, true)
    agree = float((top1 == ref).mean())
    return {"top1_agreement": agree, "recall_at_1": agree,
            "decision_agreement": float((a.decisions(1) == b.decisions(1)).mean()),
            "score_agreement": float((a.scores == b.scores).mean()),
            "mode_agreement": float((a.modes == b.modes).mean()),
            "members_detected": int(a.decisions(1).sum()), "mean_score": float(a.scores.mean())}


def _one_size(config: BenchConfig, n: int, progress: Callable[[str, int, int], None]) -> dict[str, Any]:
    t_count, dim = config.templates, config.dim
    gen = SyntheticNames(SyntheticConfig(num_names=n, dim=dim, num_templates=t_count, seed=config.seed))
    persons = config.persons if n <= 10_000 else config.persons_large
    q, person, true = gen.queries(persons, config.images_per_person, member_fraction=config.member_fraction)
    use_gpu, gpu_reason = _gpu_available(config.device)
    skipped: dict[str, str] = {}
    per: dict[str, _PerTemplate] = {}
    for m in config.methods:
        if m not in _TEMPLATE_METHODS:
            continue
        if m.endswith("-gpu"):
            reason = gpu_reason or (_faiss_gpu_reason() if m == "flat-gpu" else "")
            if reason:
                skipped[m] = reason
                continue
        if m.startswith("ivf") and n > config.approx_max_names:
            skipped[m] = f"N > approx_max_names ({config.approx_max_names}): 21 IVF indexes to train and fill"
            continue
        if m.startswith("ivf") and n < 39 * 64:
            skipped[m] = "too few names to train an IVF index (needs >= 39 x 64)"
            continue
        if m == "hnsw" and n > config.hnsw_max_names:
            skipped[m] = f"N > hnsw_max_names ({config.hnsw_max_names}): graph build too slow here"
            continue
        per[m] = _PerTemplate(m, n, dim, q, t_count, use_gpu and m.endswith("-gpu") or
                              (use_gpu and m.startswith("ivf") and config.device == "cuda"))
    if "flat" not in per:
        per["flat"] = _PerTemplate("flat", n, dim, q, t_count, False)  # the exact reference is always needed
    gen_s = 0.0
    for t in range(t_count):
        start = time.perf_counter()
        rows = gen.template(t)
        gen_s += time.perf_counter() - start
        for p in per.values():
            p.run(t, rows)
        progress(f"N={n} templates", t + 1, t_count)
        del rows
    ref = per["flat"].top1
    results: dict[str, Any] = {}
    for m, p in per.items():
        results[m] = {"qps": len(q) * t_count / p.search_s, "search_s": p.search_s, "build_s": p.build_s,
                      "index_bytes": p.index_bytes, "rss_gb_after_build": round(p.rss_gb, 3),
                      **_agreement(p.top1, ref, person, true)}
        if m in ("ivf-flat+rerank", "bf16-exact"):
            results[m]["certified_fraction"] = p.certified / (len(q) * t_count)
            results[m]["fell_back_fraction"] = p.fell_back / (len(q) * t_count)
    ens, build_s, src = None, 0.0, _TimedSource(gen)
    for m in ("ensemble", "ensemble-exact", "ensemble-bf16"):
        if m not in config.methods:
            continue
        if ens is None:  # one build serves every variant
            start = time.perf_counter()
            ens = TemplateEnsemble.build(src, n, t_count, dim)
            build_s = time.perf_counter() - start - src.seconds
        stage1, stage1_s = None, 0.0
        if m == "ensemble-bf16" and bf16_scans_pay(use_gpu):  # the means in bf16, as ensemble-bf16 loads them
            start = time.perf_counter()
            stage1 = get_backend("bf16").create(ens.dim)
            stage1.add(ens.means)
            stage1_s = time.perf_counter() - start
        src.seconds = 0.0
        start = time.perf_counter()
        res = ens.search(q, src, 1, candidates=config.candidates, fallback=m == "ensemble-exact", backend=stage1)
        total = time.perf_counter() - start
        search_s = max(total - src.seconds, 1e-9)
        results[m] = {"qps": len(q) * t_count / search_s, "search_s": search_s, "fetch_s": src.seconds,
                      "qps_including_fetch": len(q) * t_count / total, "build_s": build_s + stage1_s,
                      "bf16_scans": stage1 is not None,
                      "index_bytes": ens.nbytes + (stage1.ntotal * dim * 2 if stage1 is not None else 0),
                      "rss_gb_after_build": round(_rss_gb(), 3),
                      "certified_fraction": float(res.certified.mean()),
                      "fell_back_fraction": float(res.fell_back.mean()),
                      "radius_max": float(ens.radius.max()), "radius_name_mean": float(ens.radius_name.mean()),
                      **_agreement(res.top1, ref, person, true)}
    for m in ("cells", "cells-bf16"):
        if m not in config.methods:
            continue
        if ens is None:
            start = time.perf_counter()
            ens = TemplateEnsemble.build(src, n, t_count, dim)
            build_s = time.perf_counter() - start - src.seconds
        bf16 = m == "cells-bf16" and bf16_scans_pay(use_gpu)
        cells = _cells(ens, gen, src, q, person, true, ENSEMBLE_BF16_CANDIDATES if bf16 else config.cell_candidates,
                       use_gpu, bf16)
        top1, exact = cells.pop("top1"), cells.pop("top1_exact_mask")
        results[m] = {**cells, "build_s": build_s + cells.pop("bf16_build_s"),
                      "index_bytes": ens.nbytes + (n * t_count * dim * 2 if bf16 else 0), "bf16_scans": bf16,
                      "rss_gb_after_build": round(_rss_gb(), 3), **_agreement(top1, ref, person, true),
                      "top1_agreement_where_exact": float((top1 == ref)[exact].mean()) if exact.any() else None}
    del ens
    base = results.get("dense", {}).get("qps")
    for r in results.values():
        r["ratio_to_dense"] = r["qps"] / base if base else None
    exact_votes = paper_mode_votes(ref, person, true)
    return {"names": n, "templates": t_count, "dim": dim, "queries": len(q), "persons": len(true),
            "images_per_person": config.images_per_person, "row_generation_s": gen_s,
            "exact_members_detected": int(exact_votes.decisions(1).sum()),
            "exact_top1_true_fraction": float((ref == true[person][:, None]).mean()),
            "methods": results, "skipped": skipped, "peak_rss_gb": round(_peak_rss_gb(), 3)}


def _cells(ens: TemplateEnsemble, gen: SyntheticNames, src: _TimedSource, q: np.ndarray, person: np.ndarray,
           true: np.ndarray, candidates: int, use_gpu: bool, bf16: bool) -> dict[str, Any]:
    """The ensemble's candidates (no fallback), then per template the cells settled by witnesses and a batched
    exact top-1 of the photos they leave open (`engine.query.cells`). bf16=False: the open photos by float32
    brute force (its products on the GPU when one is used), stage 1 by exact flat search ("cells"). bf16=True:
    stage 1 and the open photos through certified bf16 scans, as `--index ensemble-bf16` runs them where
    the CPU multiplies bf16 natively ("cells-bf16"; each template's bf16 copy is made beside the timer and
    counted as build time).
    Regenerating rows (candidate rows, and each template's rows for the brute force) is excluded from q/s."""
    bf16_build_s = 0.0
    stage1 = None
    if bf16:
        start = time.perf_counter()
        stage1 = get_backend("bf16").create(ens.dim)
        stage1.add(ens.means)
        bf16_build_s += time.perf_counter() - start
    src.seconds = 0.0
    start = time.perf_counter()
    pre = ens.search(q, src, 1, candidates=candidates, fallback=False, backend=stage1)
    search_s = time.perf_counter() - start - src.seconds
    fetch_s, gen_s = src.seconds, 0.0
    y = true[person]
    top1 = np.empty((len(q), ens.num_templates), np.int64)
    exact = np.zeros_like(top1, dtype=bool)
    by_witnesses = brute = 0
    for t in range(ens.num_templates):
        start = time.perf_counter()
        rows = gen.template(t)
        gen_s += time.perf_counter() - start
        if bf16:
            start = time.perf_counter()
            scan = get_backend("bf16").create(ens.dim)
            scan.add(rows)
            bf16_build_s += time.perf_counter() - start

            def resolve(r: np.ndarray, rows: np.ndarray = rows, scan=scan) -> tuple[np.ndarray, np.ndarray]:
                res = search_exact(scan, rows, q[r], 1, fallback=True, need=Exactness.TOP1)
                return res.scores, res.ids
        else:
            norm: list[float] = []  # the rows' norm bound, measured on the first call (as the engine does)

            def resolve(r: np.ndarray, rows: np.ndarray = rows, norm: list[float] = norm
                        ) -> tuple[np.ndarray, np.ndarray]:
                norm[:] = norm or [max_row_norm(rows)]
                return exact_topk(rows, q[r], 1, row_norm=norm[0], use_gpu=use_gpu)
        start = time.perf_counter()
        true_scores = exact_scores(rows, q, y[:, None])[:, 0]
        dec = decide_cells(pre.scores[:, t], pre.ids[:, t], pre.certified[:, t], true_scores, person, true, resolve,
                           one_pass=bf16)
        search_s += time.perf_counter() - start
        top1[:, t], exact[:, t] = dec.ids[:, 0], dec.top1_exact
        by_witnesses += int((dec.settled_by == BY_WITNESSES).sum())
        brute += dec.brute_forced
        del rows
    pairs = top1.size
    return {"qps": pairs / max(search_s, 1e-9), "search_s": search_s, "fetch_s": fetch_s,
            "row_generation_s": gen_s, "top1": top1, "bf16_build_s": bf16_build_s,
            "certified_fraction": float(pre.certified.mean()),
            "cells_settled_by_witnesses": by_witnesses / max(1, len(true) * ens.num_templates),
            "fell_back_fraction": brute / max(1, pairs), "photos_brute_forced": brute,
            "top1_exact_fraction": float(exact.mean()), "top1_exact_mask": exact}


def text_encoder_bench(prompts: int, device: str) -> dict[str, Any]:
    """Stock open_clip `encode_text` vs the engine's TextEncoder on a randomly initialised ViT-B-32."""
    import open_clip
    import torch
    from idia_engine.engine.candidates.made_up import generate_names
    from idia_engine.engine.candidates.templates import PAPER_TEMPLATES

    from .text_encoder import benchmark_text_encoder

    dev = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).to(dev).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    names = generate_names(max(1, prompts // len(PAPER_TEMPLATES) + 1), seed=0).names
    texts = [tpl.format(nm) for nm in names for tpl in PAPER_TEMPLATES][:prompts]
    precisions = ("fp32", "bf16") if dev == "cpu" else ("fp32", "fp16", "bf16")
    return benchmark_text_encoder(model, tokenizer, texts, batch_size=128, precisions=precisions, device=dev)


def run_bench(config: BenchConfig, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run every size (smallest first), write results.json, results.md and throughput.png to config.out."""
    progress = progress or (lambda stage, done, total: None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    use_gpu, reason = _gpu_available(config.device)
    if config.device == "cuda" and not use_gpu:
        raise InputError(f"--device cuda: {reason}")
    started = time.perf_counter()
    result: dict[str, Any] = {"schema_version": 1, "name": config.name, "created": utc_now(),
                              "config": config.to_json(), "machine": machine_info(), "versions": library_versions(),
                              "definitions": {"qps": "(query, template) pairs per second, search only",
                                              "reference": "exact FAISS flat top-1",
                                              "decision": "paper mode, unique plurality per template, tau = 1"},
                              "methods": {m: METHODS[m] for m in config.methods}, "sizes": []}
    for n in sorted(set(config.sizes)):
        log.info("bench: %d names x %d templates", n, config.templates)
        result["sizes"].append(_one_size(config, n, progress))
        _write(result, out)  # partial results survive a long run being stopped
    if config.text_encoder_prompts:
        try:
            result["text_encoder"] = text_encoder_bench(config.text_encoder_prompts, config.device)
        except Exception as e:  # noqa: BLE001 - recorded, the search results still count
            result["text_encoder"] = {"error": f"{type(e).__name__}: {e}"}
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_gb"] = round(_peak_rss_gb(), 3)
    _write(result, out)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    members = result["config"].get("member_fraction", 1.0)
    header = ("| names | method | q/s | x dense | x flat | top-1 agree | decision agree | score agree | certified | "
              "cells by witnesses | brute-forced | build s | index MB |")
    lines = [f"Member fraction {members}; {result['machine']['cpu']} ({result['machine']['cores']} cores, "
             f"{result['machine'].get('cpu_features', '')}).", "", header, "|" + "---|" * 13]
    for size in result["sizes"]:
        flat = size["methods"].get("flat", {}).get("qps")
        for m, r in size["methods"].items():
            ratio = r.get("ratio_to_dense")
            top1 = f"{r['top1_agreement']:.4f}"
            if r.get("top1_agreement_where_exact") is not None:
                top1 += f" ({r['top1_agreement_where_exact']:.4f} where exact)"
            lines.append(
                f"| {size['names']:,} | {m} | {r['qps']:,.0f} | {'' if ratio is None else f'{ratio:.2f}'} | "
                f"{'' if not flat else format(r['qps'] / flat, '.2f')} | "
                f"{top1} | {r['decision_agreement']:.4f} | {r['score_agreement']:.4f} | "
                f"{_pct(r.get('certified_fraction'))} | {_pct(r.get('cells_settled_by_witnesses'))} | "
                f"{_pct(r.get('fell_back_fraction'))} | {r['build_s']:.1f} | {r['index_bytes'] / 2 ** 20:,.1f} |")
        for m, why in size["skipped"].items():
            lines.append(f"| {size['names']:,} | {m} | skipped: {why} |" + " |" * 10)
    te = result.get("text_encoder")
    if te and "results" in te:
        lines += ["", f"Text encoder ({te['prompts']} prompts, {te['device']}, path {te['text_path']}):", "",
                  "| config | prompts/s | x stock fp32 | min cosine vs stock fp32 |", "|---|---|---|---|"]
        for k, r in te["results"].items():
            lines.append(f"| {k} | {r['prompts_per_s']:.1f} | {r['speedup_vs_stock_fp32']:.2f} | "
                         f"{r['vs_stock_fp32']['min_cosine']:.6f} |")
    elif te:
        lines += ["", f"Text encoder: {te.get('error')}"]
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    methods = sorted({m for s in result["sizes"] for m in s["methods"]})
    for m in methods:
        pts = [(s["names"], s["methods"][m]) for s in result["sizes"] if m in s["methods"]]
        xs = [p[0] for p in pts]
        ax1.plot(xs, [p[1]["qps"] for p in pts], marker="o", label=m)
        ax2.plot(xs, [p[1]["decision_agreement"] for p in pts], marker="o", label=m)
    for ax, title in ((ax1, "(query, template) pairs / s"), (ax2, "person decision agreement vs exact")):
        ax.set_xscale("log")
        ax.set_xlabel("candidate names")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{result['machine']['cpu']} ({result['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(result: dict[str, Any], out: Path) -> None:
    for name, text in (("results.json", json.dumps(result, indent=2, default=str)),
                       ("results.md", markdown_table(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    if result["sizes"]:
        _plot(result, out / "throughput.png")


def default_out(root: Path = Path("benchmarks/results")) -> Path:
    """benchmarks/results/<UTC timestamp>-<host>."""
    return root / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{platform.node() or 'machine'}"


__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "QUICK",
    "BenchConfig",
    "default_out",
    "markdown_table",
    "run_bench",
]
