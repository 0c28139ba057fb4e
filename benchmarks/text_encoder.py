"""Stock `encode_text` against the engine's fast text pass (`engine/model/text_encoder.py`), same prompts.

`idia-engine bench` runs it beside the search benchmarks; its figures, with the CPU they were measured on,
are in `benchmarks/results/` and `benchmarks/README.md`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from idia_engine.engine.disk.versions import library_versions
from idia_engine.engine.model.text_encoder import TextEncoder, bf16_supported, pooled_positions
from torch import nn


def _autocast(device: torch.device, precision: str):
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_text_encoder(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                           prompts: Sequence[str], *, batch_size: int = 256,
                           precisions: Sequence[str] = ("fp32", "bf16"), rounds: int = 1,
                           device: torch.device | str | None = None,
                           progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Time stock `model.encode_text` against `TextEncoder` on the same prompts; return a JSON-friendly dict.

    Prompts are tokenized once and cut into batches of `batch_size` in the given order (build-index passes
    one template over a chunk of names per call). Each configuration (stock/fast x precision; "fp32" must be
    among `precisions`, stock fp32 is the baseline) first runs one untimed warm-up batch. Then, for `rounds`
    passes, every batch is run by every configuration in turn, so that changing machine load hits them
    alike; a configuration's time is the sum over its batches, its rate the prompts per second of the median
    round. Agreement is measured on L2-normalised embeddings of the first round: max abs difference and min
    cosine (higher = closer, 1 = identical) against stock fp32 and against stock at the same precision.
    Tokenization is timed separately: it is the same for both paths.
    """
    prompts = list(prompts)
    _check_arguments(precisions, batch_size, rounds, prompts)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    tokens = tokenizer(prompts)
    tokenize_s = time.perf_counter() - start
    batches = [tokens[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    encoder = TextEncoder(model)
    fns = {"stock": lambda t: model.encode_text(t.to(device)), "fast": encoder.encode}
    times, emb = _time_configurations(fns, batches, precisions, rounds, device, progress)
    lengths = None
    if encoder._tower is not None:
        lengths = pooled_positions(tokens, encoder._tower.pool_type, encoder._tower.eos_id) + 1
    return {
        "prompts": len(prompts),
        "batch_size": batch_size,
        "rounds": rounds,
        "device": str(device),
        "text_path": encoder.path.value,
        "text_path_reason": encoder.reason,
        "context_length": int(tokens.shape[1]),
        "mean_tokens_per_prompt": None if lengths is None else float(lengths.float().mean()),
        "tokenize_prompts_per_s": len(prompts) / tokenize_s,
        "bf16_native": bf16_supported(device),
        "results": _results(times, emb, len(prompts)),
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": library_versions(),
    }


def _check_arguments(precisions: Sequence[str], batch_size: int, rounds: int, prompts: Sequence[str]) -> None:
    if "fp32" not in precisions:
        raise ValueError(f"precisions must include fp32, the baseline; got {list(precisions)}")
    if batch_size < 1 or rounds < 1:
        raise ValueError(f"batch_size and rounds must be >= 1, got {batch_size} and {rounds}")
    if not prompts:
        raise ValueError("benchmark_text_encoder needs at least one prompt")


def _time_configurations(fns: dict[str, Callable], batches: list[torch.Tensor], precisions: Sequence[str],
                         rounds: int, device: torch.device, progress: Callable[[str, int, int], None] | None
                         ) -> tuple[dict, dict]:
    """Seconds per round of every (path, precision), and its L2-normalised embeddings of the first round."""
    configs = [(kind, p) for p in precisions for kind in ("stock", "fast")]
    times: dict[tuple[str, str], list[float]] = {c: [0.0] * rounds for c in configs}
    outputs: dict[tuple[str, str], list[torch.Tensor]] = {c: [] for c in configs}
    total, done = len(batches) * rounds + 1, 0
    with torch.inference_mode():
        for kind, precision in configs:  # warm-up, untimed
            with _autocast(device, precision):
                fns[kind](batches[0])
        if progress:
            progress("benchmark", done := done + 1, total)
        for r in range(rounds):
            for b in batches:
                for kind, precision in configs:
                    _sync(device)
                    start = time.perf_counter()
                    with _autocast(device, precision):
                        out = fns[kind](b)
                    _sync(device)
                    times[(kind, precision)][r] += time.perf_counter() - start
                    if r == 0:
                        outputs[(kind, precision)].append(F.normalize(out.float(), dim=-1).cpu())
                if progress:
                    progress("benchmark", done := done + 1, total)
    return times, {c: torch.cat(v) for c, v in outputs.items()}


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    return {"max_abs_diff": float((a - b).abs().max()), "min_cosine": float((a * b).sum(dim=1).min())}


def _results(times: dict, emb: dict, n: int) -> dict[str, Any]:
    """Rates of the median round, speed-ups over stock fp32 and agreement, per configuration."""
    base = n / statistics.median(times[("stock", "fp32")])
    results: dict[str, Any] = {}
    for (kind, precision), ts in times.items():
        rate = n / statistics.median(ts)
        results[f"{kind}_{precision}"] = {
            "prompts_per_s": rate,
            "seconds_per_round": ts,
            "speedup_vs_stock_fp32": rate / base,
            "vs_stock_fp32": _agreement(emb[(kind, precision)], emb[("stock", "fp32")]),
            "vs_stock_same_precision": _agreement(emb[(kind, precision)], emb[("stock", precision)]),
        }
    return results
