"""Which index to build for a label space: a pure function of sizes, memory budget and device.

What the choice rests on (measured on structured synthetic CLIP-like data, image queries far from their true
name; see tests/test_ann.py, with the figures in benchmarks/README.md): an IVF index cannot certify exact
decisions for such out-of-distribution queries. Each name carries its own component in a direction no list
summary predicts, so every per-list bound stays far above the top score and the certificate fails for
nearly every query even at nprobe = nlist - 1; all of them then fall back to brute force. Codes scanned
in full do certify (SQfp16, SQ8 with 64 candidates), because their worst-case code error is below the gap
between the best score and the 64th. So with `exact_decisions` (the engine's paper mode) the choice is among
exact paths, smallest first that fits the budget: on a CPU with native bf16 and from ENSEMBLE_BF16_MIN_NAMES
names, `ensemble-bf16` (measured faster than flat there); flat; on a CPU then the template ensemble, whose query
settles (person, template) cells by witnesses and brute-forces open ones over the raw rows kept on disk
(`engine/query/cells.py`; faiss's scalar-code scans are not BLAS GEMMs and ran 5-7x slower than flat on
an AVX2 CPU); then full-scan codes. IVF is chosen only when approximate decisions are acceptable
(exact_decisions=False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import IndexSpecError

# On a CPU that multiplies bf16 natively, `ensemble-bf16` (cells by witnesses, certified bf16 scans for the rest)
# beat flat from here on (measured on a 2-core Xeon with AMX, 21 templates, D = 512: 0.44x flat at 10^4 names in
# an earlier build; at 10^5, 1.99x with every person a member, its worst case; benchmarks/README.md).
ENSEMBLE_BF16_MIN_NAMES = 50_000
FLAT_MAX_NAMES_CPU = 200_000  # above this, CPU flat search is slow enough that IVF pays (approximate mode)
FLAT_MAX_NAMES_GPU = 5_000_000  # GPU brute force stays fast up to a few million rows
ID_BYTES = 8  # IVF lists store an int64 id per row
MIN_NLIST, MAX_NLIST = 64, 65_536
# faiss GPU IVFPQ: supported bytes per code (8-bit sub-quantizers) and dimensions per sub-quantizer.
GPU_PQ_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_SUBDIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)


@dataclass(frozen=True)
class IndexChoice:
    """An index to build, its default search parameters and why."""

    factory: str  # faiss factory string for the "faiss" backend ("Flat", "SQ8", "IVF4096,SQ8", ...)
    search_params: dict[str, Any] = field(default_factory=dict)  # default per-call parameters, e.g. {"nprobe": 64}
    reason: str = ""  # one sentence: why this index
    bytes_total: int = 0  # estimated memory of all templates' indexes together
    gpu_float16: bool = False  # on a GPU, store a flat index in float16 (only chosen when float32 does not fit)
    registry_kind: str = ""  # a registered kind that is not a faiss factory string ("ensemble"), else ""

    @property
    def kind(self) -> str:
        """The registry kind, as recorded in the index manifest."""
        return self.registry_kind or f"faiss:{self.factory}"


def ensemble_bytes(num_names: int, num_templates: int, dim: int) -> int:
    """Memory of the template ensemble at query time: the float32 means, the flat index over them (a copy),
    per-name radii and per-template offsets; the raw vectors stay on disk (memory-mapped, read in chunks)."""
    return 2 * num_names * dim * 4 + num_names * 8 + num_templates * (dim + 1) * 8


def ensemble_bf16_bytes(num_names: int, num_templates: int, dim: int) -> int:
    """Memory of `ensemble-bf16` at query time: the ensemble's, the means in bf16 for stage 1, and one template's
    bf16 rows at a time (the float32 rows and the other templates' bf16 files stay on disk)."""
    return ensemble_bytes(num_names, num_templates, dim) + 2 * num_names * dim * 2


def code_bytes(codec: str, dim: int) -> int:
    """Bytes per row of a codec: "Flat" (float32), "Flat16" (GPU float16 storage), "SQfp16", "SQ8", "PQ<m>"."""
    if codec == "Flat":
        return 4 * dim
    if codec in ("Flat16", "SQfp16"):
        return 2 * dim
    if codec == "SQ8":
        return dim
    if codec.startswith("PQ") and codec[2:].isdigit():
        return int(codec[2:])  # 8-bit sub-quantizers
    raise IndexSpecError(f"unknown codec {codec!r}; known: Flat, Flat16, SQfp16, SQ8, PQ<m>")


def estimate_index_bytes(codec: str, num_names: int, dim: int, nlist: int = 0) -> int:
    """Memory of one template's index: codes, plus ids, centroids and per-list statistics for IVF."""
    size = num_names * code_bytes(codec, dim)
    if nlist:
        size += num_names * ID_BYTES + nlist * dim * 4 + nlist * 5 * 8
    return size


def ivf_nlist(num_names: int) -> int:
    """~4 sqrt(N) rounded to the nearest power of two, at most N/39 (k-means wants ~39 points per list)."""
    target = 4 * math.sqrt(max(1, num_names))
    nlist = 2 ** round(math.log2(target))
    while nlist > MIN_NLIST and nlist * 39 > num_names:
        nlist //= 2
    return int(min(MAX_NLIST, max(MIN_NLIST, nlist)))


def ivf_nprobe(nlist: int) -> int:
    """Lists probed per query: 1/16 of them (at least 16): out-of-distribution image queries need many."""
    return int(min(nlist, max(16, nlist // 16)))


def _pq_options(dim: int, device: str) -> list[int]:
    """Sub-quantizer counts m (8-bit) that divide dim, largest first; restricted to what faiss GPU supports."""
    ms = [m for m in range(dim // 2, 0, -1) if dim % m == 0 and dim // m >= 2]
    if device == "cuda":
        ms = [m for m in ms if m in GPU_PQ_BYTES and dim // m in GPU_PQ_SUBDIMS]
    return ms


def _check_inputs(num_names: int, num_templates: int, dim: int, memory_budget_bytes: int, device: str) -> None:
    for what, value in (("num_names", num_names), ("num_templates", num_templates), ("dim", dim),
                        ("memory_budget_bytes", memory_budget_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise IndexSpecError(f"{what} must be a positive integer, got {value!r}")
    if device not in ("cpu", "cuda"):
        raise IndexSpecError(f"device must be 'cpu' or 'cuda', got {device!r}")


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def choose_index(num_names: int, num_templates: int, dim: int, memory_budget_bytes: int, device: str,
                 *, exact_decisions: bool = True, cpu_bf16: bool = False) -> IndexChoice:
    """The index for `num_names` names x `num_templates` templates of dimension `dim`, all templates' indexes
    fitting in `memory_budget_bytes` together, searched on `device` ("cpu" or "cuda").

    exact_decisions: the engine must reproduce exact arg-max decisions (certificate + fallback); only indexes
    scanned in full certify image queries (see the module docstring). False: approximate search is fine,
    IVF by memory budget for large label spaces.
    cpu_bf16: the CPU multiplies bf16 natively (`indexes.hardware.cpu_bf16_native`); then, for exact decisions
    on a CPU from ENSEMBLE_BF16_MIN_NAMES names on, `ensemble-bf16` comes first, as it measured faster than flat.
    Raises IndexSpecError when nothing fits the budget."""
    _check_inputs(num_names, num_templates, dim, memory_budget_bytes, device)
    n, t = num_names, num_templates

    def total(codec: str, nlist: int = 0) -> int:
        return t * estimate_index_bytes(codec, n, dim, nlist)

    def fits(codec: str, nlist: int = 0) -> bool:
        return total(codec, nlist) <= memory_budget_bytes

    budget = f"{_gib(memory_budget_bytes)} budget"
    ens_bf16 = ensemble_bf16_bytes(n, t, dim)
    if device == "cpu" and exact_decisions and cpu_bf16 and ens_bf16 <= memory_budget_bytes and (
            n >= ENSEMBLE_BF16_MIN_NAMES or not fits("Flat")):
        return IndexChoice("ensemble-bf16", {}, f"exact decisions on a CPU with native bf16, {n} names: cells settled "
                           "by witnesses, open photos by certified bf16 scans (faster than flat from "
                           f"{ENSEMBLE_BF16_MIN_NAMES} names); {_gib(ens_bf16)} in memory fits the {budget}",
                           ens_bf16, registry_kind="ensemble-bf16")
    flat_max = FLAT_MAX_NAMES_GPU if device == "cuda" else FLAT_MAX_NAMES_CPU
    if (n <= flat_max or exact_decisions) and fits("Flat"):
        return IndexChoice("Flat", {}, f"{n} names x {t} templates: exact flat search fits the {budget} "
                           f"({_gib(total('Flat'))})", total("Flat"))
    if device == "cuda" and (n <= flat_max or exact_decisions) and fits("Flat16"):
        return IndexChoice("Flat", {}, f"flat float32 needs {_gib(total('Flat'))}; float16 GPU storage fits the "
                           f"{budget} ({_gib(total('Flat16'))}) and is certified against its rounding",
                           total("Flat16"), gpu_float16=True)
    nlist = ivf_nlist(n)
    if exact_decisions:
        if device == "cuda":
            # faiss GPU has no flat SQ index: an IVF-SQ8 probing every list is the same full scan.
            if fits("SQ8", nlist):
                return IndexChoice(f"IVF{nlist},SQ8", {"nprobe": nlist},
                                   f"exact decisions need a full scan; float16 flat needs {_gib(total('Flat16'))}, "
                                   f"IVF{nlist},SQ8 probing all lists fits the {budget}", total("SQ8", nlist))
        else:
            ens = ensemble_bytes(n, t, dim)
            if ens <= memory_budget_bytes:
                return IndexChoice("ensemble", {}, f"exact decisions; flat needs {_gib(total('Flat'))}, the template "
                                   f"ensemble ({_gib(ens)}, raw vectors on disk) fits the {budget}: cells are settled "
                                   "by witnesses and open ones brute-forced over the raw rows, faster on a CPU than "
                                   "a full scan of scalar codes", ens, registry_kind="ensemble")
            for codec in ("SQfp16", "SQ8"):
                if fits(codec):
                    return IndexChoice(codec, {}, f"exact decisions need a full scan; flat needs "
                                       f"{_gib(total('Flat'))}, {codec} codes fit the {budget} and are certified "
                                       "against their code error", total(codec))
        raise IndexSpecError(
            f"the {budget} cannot hold {n} names x {t} templates at dim {dim} for exact decisions: the smallest "
            f"certifiable index (SQ8) needs {_gib(total('SQ8', nlist if device == 'cuda' else 0))}; raise the "
            "budget or accept approximate decisions (exact_decisions=False)")
    params = {"nprobe": ivf_nprobe(nlist)}
    for codec in ["Flat", "SQ8"] + [f"PQ{m}" for m in _pq_options(dim, device)]:
        if fits(codec, nlist):
            return IndexChoice(f"IVF{nlist},{codec}", params,
                               f"{n} names (> {flat_max} or flat over budget): IVF with nlist {nlist} ~ 4 sqrt(N); "
                               f"{codec} codes are the most precise that fit the {budget} "
                               f"({_gib(total(codec, nlist))})", total(codec, nlist))
    smallest = _pq_options(dim, device)[-1:] or [1]
    raise IndexSpecError(f"the {budget} cannot hold {n} names x {t} templates at dim {dim}: even "
                         f"IVF{nlist},PQ{smallest[0]} needs {_gib(total(f'PQ{smallest[0]}', nlist))}")
