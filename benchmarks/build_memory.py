"""Peak memory of a streaming build at 10^6 names x 21 templates, through the real `build_index`.

Encoding 21 M prompts with a real text tower takes hours on a CPU, so the text encoder is replaced by a
stand-in that returns structured embeddings at memory-bandwidth speed: name = first-name part +
last-name part + template part + a per-prompt part, L2-normalised, a pure function of the prompt text
(so a resumed build gets the same rows). Everything else (names file reading, chunked vectors files,
progress commits, index training on a sample, filling in chunks, the manifest) is the engine's code.

    python -m idia_engine.benchmarks.build_memory --names 1000000 --dim 128 --index IVF1024,PQ16 --out DIR

Prints and writes a JSON line: peak RSS (this process, sampled), time, index bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import psutil
import torch
from idia_engine.engine.candidates.made_up import generate_names
from idia_engine.engine.candidates.templates import PAPER_TEMPLATES
from idia_engine.engine.index.build import BuildConfig, build_index
from idia_engine.engine.model.load import ModelInfo, Precision
from idia_engine.engine.model.text_encoder import TextPath


@dataclass
class StandInTextModel:
    """Just enough of LoadedModel for build_index: info, device, precision, tokenizer, encode_text."""

    info: ModelInfo
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: Precision = Precision.FP32
    text_path: TextPath = TextPath.STOCK  # a manifest field; the model name says "stand-in"
    # open_clip's own BPE tokenizer (shipped with the package): build_index drops names with an earlier
    # name's token ids, as it does for a real model.
    tokenizer: Any = field(default_factory=lambda: open_clip.tokenizer.SimpleTokenizer())

    def __post_init__(self) -> None:
        dim = self.info.embed_dim
        rng = np.random.default_rng(0)
        self._words = rng.standard_normal((4096, dim)).astype(np.float32)  # hashed word parts

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        # Each word contributes a vector picked by a hash of the word: prompts sharing a first or last name
        # (or template words) share components, like real name encodings.
        rows = np.zeros((len(prompts), self.info.embed_dim), np.float32)
        for i, prompt in enumerate(prompts):
            ids = [zlib.crc32(w.encode("utf-8")) & 4095 for w in prompt.split()]
            rows[i] = self._words[ids].sum(axis=0)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return rows


def _stand_in_info(dim: int) -> ModelInfo:
    return ModelInfo(model="stand-in", pretrained="none", weights_source="stand-in", open_clip_name="stand-in",
                     model_config={"embed_dim": dim}, preprocess={}, embed_dim=dim, context_length=77,
                     checkpoint_sha256=None, fingerprint=hashlib.sha256(f"stand-in-{dim}".encode()).hexdigest())


def write_names(out: Path, count: int) -> Path:
    """out/names.txt with `count` made-up names (kept when it is already there: a rerun resumes its build)."""
    names_file = out / "names.txt"
    if not names_file.exists():
        names = generate_names(count, seed=42, first_names=4275, surnames=88799).names
        names_file.write_text("\n".join(names) + "\n", encoding="utf-8")
    return names_file


class PeakRss:
    """Samples this process's RSS every 50 ms in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:  # noqa: PYI034 - a plain class, never subclassed
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--templates", type=int, default=21)
    parser.add_argument("--index", default="IVF1024,PQ16")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    names_file = write_names(args.out, args.names)
    model = StandInTextModel(_stand_in_info(args.dim))
    config = BuildConfig(names_file=names_file, index_dir=args.out / "index", templates=PAPER_TEMPLATES[:args.templates],
                         index_kind=args.index, batch_size=args.batch_size, overwrite=True)
    t0 = time.perf_counter()
    with PeakRss() as rss:
        manifest = build_index(replace(config), model=model)
    seconds = time.perf_counter() - t0
    result = {"names": manifest.num_names, "templates": manifest.num_templates, "dim": args.dim,
              "index_kind": manifest.index_kind, "seconds": round(seconds, 1), "peak_rss_gib": round(rss.peak / 2**30, 2),
              "bytes_on_disk": sum(manifest.files.values()), "machine_cores": psutil.cpu_count(),
              "machine_ram_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    (args.out / "build_memory.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
