"""`build-index` on Ray actors beside the same build in one process, in the same run.

Builds one names file three ways on this machine: in this process (the baseline), on a local Ray with one
actor using every CPU (the default plan: actors run this process's thread count), and with one
single-threaded actor per CPU (`--ray-actors`; float32 sums over other thread counts differ in the last
bits, and the benchmark says by how much). Reports wall time of each whole build
(the actors encode ahead while the driver indexes, so encode seconds alone would flatter Ray), its ratio
to the baseline, Ray's start-up apart, and whether every index file is byte-identical to the baseline's.

    python -m idia_engine.benchmarks.ray_encode --names 2000 --model ViT-B-32 --pretrained none \\
        --out benchmarks/results/<folder>

A local Ray on one machine cannot beat one process that already uses every core; what it shows is the cost
of the actors (start-up, model loads, transfers) and that the result does not change. The gain is on a
cluster: prompts/s scale with the actors' GPUs or CPUs, with the driver's indexing overlapped.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from ..engine.candidates.made_up import generate_names
from ..engine.candidates.templates import PAPER_TEMPLATES
from ..engine.index.build import BuildConfig, build_index
from ..engine.model.load import ModelSpec, load_model
from .run import machine_info


def _files(index_dir: Path) -> dict[str, bytes]:
    manifest = json.loads((index_dir / "manifest.json").read_text(encoding="utf-8"))
    return {f: (index_dir / manifest["data_dir"] / f).read_bytes() for f in manifest["files"]}


def _max_abs_difference(index_dir: Path, baseline_dir: Path) -> float:
    """Largest |difference| of any stored prompt vector against the baseline's (flat indexes)."""
    import faiss
    import numpy as np

    worst = 0.0
    for name in sorted(_files(baseline_dir)):
        if name.endswith(".faiss"):
            paths = [d / json.loads((d / "manifest.json").read_text())["data_dir"] / name for d in (index_dir, baseline_dir)]
            a, b = (faiss.read_index(str(p)) for p in paths)
            worst = max(worst, float(np.abs(a.reconstruct_n(0, a.ntotal) - b.reconstruct_n(0, b.ntotal)).max()))
    return worst


def measure(names: int, model: str, pretrained: str | None, batch_size: int, index_kind: str) -> dict:
    import ray

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ray-encode-bench-") as tmp:
        root = Path(tmp)
        names_file = root / "names.txt"
        names_file.write_text("\n".join(generate_names(names, seed=11).names) + "\n", encoding="utf-8")
        spec = ModelSpec(model, pretrained)
        driver_model = load_model(spec, "cpu", "fp32")
        runs = {}

        def build(label: str, **ray_options) -> None:
            t0 = time.perf_counter()
            manifest = build_index(BuildConfig(names_file=names_file, index_dir=root / label, model=spec,
                                               templates=PAPER_TEMPLATES, index_kind=index_kind, device="cpu",
                                               precision="fp32", batch_size=batch_size, **ray_options),
                                   model=driver_model)
            seconds = time.perf_counter() - t0
            runs[label] = {"wall_s": round(seconds, 2), "prompts": manifest.encode["prompts"],
                           "prompts_per_s_wall": round(manifest.encode["prompts"] / seconds, 1),
                           "encode": {k: manifest.encode.get(k) for k in ("device", "ray", "text_path", "precision")}}
            print(label, runs[label], flush=True)

        build("single process")
        t0 = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_start_s = time.perf_counter() - t0
        try:
            build(f"ray: 1 actor x {cpus} threads", ray="local", ray_actors=1)
            build(f"ray: {cpus} actors x 1 thread", ray="local", ray_actors=cpus)
        finally:
            ray.shutdown()
        baseline = _files(root / "single process")
        for label, run in runs.items():
            files = _files(root / label)
            run["x_single_process"] = round(runs["single process"]["wall_s"] / run["wall_s"], 3)
            run["identical_files"] = f"{sum(files[f] == baseline.get(f) for f in files)} of {len(baseline)}"
            run["max_abs_vector_difference"] = _max_abs_difference(root / label, root / "single process")
    return {"names": names, "templates": len(PAPER_TEMPLATES), "model": model, "pretrained": pretrained,
            "batch_size": batch_size, "index": index_kind, "ray_start_s": round(ray_start_s, 2), "runs": runs,
            "machine": machine_info()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=2000)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none", help="none: random weights (no download); a tag or path")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--index", default="flat")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = measure(args.names, args.model, args.pretrained, args.batch_size, args.index)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_encode.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
