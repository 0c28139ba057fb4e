"""The offline pipeline demo: a tiny random-weight model, generated faces, build-index, query.

This shows the pipeline, not the attack: the model has learned nothing (random weights), so its
decisions and the metrics against the demo's arbitrary labels are meaningless. A demo world where the
model really learns some people is planned (see the project's issues).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .model import ModelSpec
from .name_index import BuildConfig, IndexManifest, build_index
from .progress import Progress, no_progress
from .query import QueryConfig, QueryResult, run_query
from .synthetic import tiny_names, write_faces, write_tiny_model


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("idia-demo")  # everything the demo writes goes here
    candidates: int = 200  # names in the index
    persons: int = 8  # people with photos (their names are among the candidates)
    images_per_person: int = 6
    seed: int = 0


@dataclass(frozen=True)
class DemoResult:
    index: IndexManifest
    query: QueryResult
    workdir: Path


def run_demo(config: DemoConfig = DemoConfig(), progress: Progress = no_progress) -> DemoResult:
    work = Path(config.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config_path, ckpt_path = write_tiny_model(work / "model", seed=config.seed)
    names = tiny_names(config.candidates, seed=config.seed)
    (work / "names.txt").write_text("# demo candidates\n" + "\n".join(names) + "\n", encoding="utf-8")
    people = names[: config.persons]
    write_faces(work / "faces", people, config.images_per_person, seed=config.seed)
    # Arbitrary labels (every other person a "member"): they only exercise the metrics code.
    (work / "labels.csv").write_text(
        "name,member\n" + "".join(f"{p},{int(i % 2 == 0)}\n" for i, p in enumerate(people)), encoding="utf-8")
    manifest = build_index(BuildConfig(names_file=work / "names.txt", index_dir=work / "index",
                                       model=ModelSpec(str(config_path), str(ckpt_path)), overwrite=True), progress)
    result = run_query(QueryConfig(index_dir=work / "index", faces_dir=work / "faces", out_dir=work / "report",
                                   labels_file=work / "labels.csv", seed=config.seed), progress)
    return DemoResult(manifest, result, work)
