"""Benchmarks of the engine at scale (installed as `idia_engine.benchmarks`).

- `synthetic`: structured CLIP-like name embeddings with random access by (template, id), image queries.
- `run`: `run_bench(BenchConfig)`, every search method beside the dense baseline measured in the same run
  (the `idia-engine bench` command); results under benchmarks/results/<name>/.
- `real_stats`: the generator's neighbour statistics beside a real (demo-model) encoding of census names.
- `gpu.sh`: one prepared script for a machine with a CUDA GPU.
"""
