"""What reduced precision buys for the brute-force scan on this machine: the score matrix of Q image queries
against N name rows (D dimensions) in float32, float16, bfloat16 and int8, each beside float32 in the same run.

A certified reduced-precision scan (store rows in float16 or int8, bound the error, re-score near the top
exactly) only pays where the hardware multiplies in that precision natively: AVX-512 BF16/FP16 or AMX on a
CPU, tensor cores on a GPU. Where it does not (an AVX2 + FMA CPU emulates them), it is slower than the
float32 GEMM the engine's brute force uses, whatever it saves in memory. This module measures it:

    python -m idia_engine.benchmarks.precision --out benchmarks/results/<folder>

Writes precision.json: seconds per product, GFLOP/s, the ratio to float32, the CPU and its features.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def _time(fn, repeat: int) -> float:
    fn()  # warm-up: allocations, thread pools
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def measure(queries: int = 300, names: int = 100_000, dim: int = 512, repeat: int = 2, device: str = "cpu"
            ) -> dict[str, Any]:
    """Seconds of one [queries x names] score matrix per precision on `device`, with GFLOP/s and x float32."""
    from .run import machine_info

    gen = torch.Generator().manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(names, dim, generator=gen), dim=1).to(device)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=gen), dim=1).to(device)
    flops = 2.0 * queries * names * dim
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cases = {"float32": (q, rows), "float16": (q.half(), rows.half()), "bfloat16": (q.bfloat16(), rows.bfloat16())}
    out: dict[str, Any] = {}
    for name, (a, b) in cases.items():
        try:
            s = _time(lambda a=a, b=b: (a @ b.T, sync()), repeat)
            out[name] = {"seconds": s, "gflops": flops / s / 1e9}
        except RuntimeError as e:  # a precision the device does not implement
            out[name] = {"error": str(e).splitlines()[0]}
    qi = (q * 127).round().to(torch.int8)
    ri = (rows * 127).round().to(torch.int8)
    try:
        s = _time(lambda: (torch._int_mm(qi, ri.T), sync()), repeat)
        out["int8 (torch._int_mm)"] = {"seconds": s, "gflops": flops / s / 1e9}
    except RuntimeError as e:
        out["int8 (torch._int_mm)"] = {"error": str(e).splitlines()[0]}
    base = out["float32"]["seconds"]
    for r in out.values():
        if "seconds" in r:
            r["x_float32_speed"] = base / r["seconds"]
    return {"queries": queries, "names": names, "dim": dim, "device": device, "machine": machine_info(),
            "torch": torch.__version__, "results": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--names", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = measure(args.queries, args.names, args.dim, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(result, indent=2))
    for name, r in result["results"].items():
        print(f"{name:22s} " + (f"{r['seconds']:.3f} s  {r['gflops']:.1f} GFLOP/s  x{r['x_float32_speed']:.2f} "
                                "float32 speed" if "seconds" in r else r["error"]))


if __name__ == "__main__":
    main()
