"""Throughput of `labels`: captions per second with 10^5 candidate names, 1 worker beside 2 in the same run,
and the plain-regex baseline (one compiled alternation of every name) on a sample of the same captions.

Captions are generated to look like LAION's English alt-texts: 8-16 words (about 60-100 characters) of a
caption vocabulary, and a name of the candidate list in a fixed share of them (default 5 %), at a random
position, sometimes with punctuation around it. The counts of every run must agree (checked).

    python -m idia_engine.benchmarks.caption_labels --rows 1000000 --names 100000 --out benchmarks/results/<folder>

Writes caption_labels.json: rows, names, seconds and captions/s per setting, the ratio 2 workers / 1
worker, the regex baseline's captions/s, the agreement, the CPU, and what a LAION-2B pass would take at the
measured rate.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..engine.candidates.made_up import generate_names
from ..engine.ground_truth.matcher import NameMatcher, normalize_text
from ..engine.ground_truth.run import CaptionLabelsConfig, count_caption_labels

WORDS = ("photo portrait of a the at with and in on red carpet event premiere smiling woman man actor singer "
         "stage concert press conference award night city street beach summer new film poster close-up face "
         "wearing dress suit black white blue stock image hd wallpaper 2019 2020 vintage style").split()
LAION_2B_ROWS = 2_320_000_000


def generate_captions(rows: int, names: list[str], name_share: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 17, rows)
    words = np.array(WORDS, object)
    with_name = rng.random(rows) < name_share
    picks = rng.integers(0, len(names), rows)
    captions = []
    for i in range(rows):
        parts = list(words[rng.integers(0, len(words), lengths[i])])
        if with_name[i]:
            name = names[picks[i]]
            if rng.random() < 0.2:
                name = f"({name})" if rng.random() < 0.5 else f"{name},"
            parts.insert(int(rng.integers(0, len(parts) + 1)), name)
        captions.append(" ".join(parts))
    return captions


def regex_baseline(names: list[str], captions: list[str]) -> tuple[float, dict[int, int]]:
    """captions/s of one compiled alternation of all names (longest first) with whole-word guards, and the
    per-name counts it finds (overlapping names are not all found by one alternation: the agreement is
    reported, not assumed)."""
    keys = sorted({normalize_text(n, False) for n in names}, key=len, reverse=True)
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, keys)) + r")(?!\w)")
    index = {normalize_text(n, False): i for i, n in enumerate(names)}
    counts: dict[int, int] = {}
    start = time.perf_counter()
    for caption in captions:
        for hit in set(pattern.findall(normalize_text(caption, False))):
            counts[index[hit]] = counts.get(index[hit], 0) + 1
    return len(captions) / (time.perf_counter() - start), counts


def run(rows: int, n_names: int, name_share: float, files: int, out_dir: Path | None, seed: int = 0,
        regex_rows: int = 2_000) -> dict:
    from .run import machine_info

    names = generate_names(n_names, seed=seed).names
    captions = generate_captions(rows, names, name_share, seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_file = -(-rows // files)
        for f in range(files):
            pq.write_table(pa.table({"caption": captions[f * per_file:(f + 1) * per_file]}), tmp / f"part-{f}.parquet",
                           row_group_size=100_000)
        names_file = tmp / "names.txt"
        names_file.write_text("\n".join(names) + "\n", encoding="utf-8")
        build_start = time.perf_counter()
        NameMatcher(names)
        build_s = time.perf_counter() - build_start
        settings = {}
        results = {}
        for workers in (1, 2):
            start = time.perf_counter()
            result = count_caption_labels(CaptionLabelsConfig(inputs=(tmp,), names_file=names_file,
                                                              out=tmp / f"labels-{workers}.csv", workers=workers))
            seconds = time.perf_counter() - start
            results[workers] = result.counts
            settings[f"workers_{workers}"] = {"seconds": seconds, "captions_per_s": rows / seconds}
    sample = captions[:regex_rows]
    matcher = NameMatcher(names)
    counts = np.zeros(len(names), np.int64)
    start = time.perf_counter()
    matcher.count(sample, counts)
    matcher_rate = len(sample) / (time.perf_counter() - start)
    regex_rate, regex_counts = regex_baseline(names, sample)
    regex_agree = sum(1 for i in range(len(names)) if regex_counts.get(i, 0) == counts[i]) / len(names)
    rate_1 = settings["workers_1"]["captions_per_s"]
    report = {
        "rows": rows, "names": n_names, "name_share": name_share, "files": files,
        "matcher_build_s": build_s,
        "settings": settings,
        "scaling_2_over_1": settings["workers_2"]["captions_per_s"] / rate_1,
        "counts_identical_1_vs_2_workers": results[1] == results[2],
        "same_sample": {"rows": len(sample), "matcher_captions_per_s": matcher_rate,
                        "regex_alternation_captions_per_s": regex_rate, "matcher_over_regex": matcher_rate / regex_rate,
                        "regex_agreement_per_name": regex_agree},
        "laion_2b_estimate": {"rows": LAION_2B_ROWS, "hours_per_worker": LAION_2B_ROWS / rate_1 / 3600,
                              "note": "at the 1-worker rate measured here, reading Parquet from local disk; "
                                      "divide by the workers of a cluster"},
        "machine": machine_info(),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "caption_labels.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--names", type=int, default=100_000)
    parser.add_argument("--name-share", type=float, default=0.05)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--regex-rows", type=int, default=2_000, help="captions the regex baseline reads")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    print(json.dumps(run(args.rows, args.names, args.name_share, args.files, args.out, regex_rows=args.regex_rows),
                     indent=2))


if __name__ == "__main__":
    main()
