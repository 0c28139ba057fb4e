"""The offline demo: a synthetic world, a CLIP trained on it that knows some people, and the attack on it.

Steps (each through the same library functions the CLI calls):
1. `world.make_world`: identities with made-up census names and face-like looks; half of them are
   members, seen in training 1, 5, 10, 25, 50 or 75 times; half of the non-members are look-alikes or
   namesakes of a member (`labels.csv` says whose); everyone has held-out photos.
2. `training.train_clip_on_world`: a small open_clip model trained from scratch on the members' captioned
   photos plus caption noise, saved as an open_clip config JSON + checkpoint.
3. `index.build.build_index` over the candidate names (everyone in the world plus made-up names, like
   the paper's candidate set), loading the model exactly as a user's checkpoint.
4. `query.run_query` on the held-out photos with the ground-truth labels.
5. `evaluate.evaluate_report`: the paper's protocol (n = 1, 3, ..., images per person, 20 draws each),
   ROC, AUC, TPR at low FPR, TPR per training-occurrence count.

The whole run is a function of the seed. Everything lands in `workdir`, which the demo owns: it
refuses a non-empty folder that is not an earlier demo.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..candidates.made_up import generate_names
from ..disk.textfiles import check_whole_number
from ..errors import ArtifactExistsError, InputError
from ..evaluate.protocol import EvalConfig, EvalResult, evaluate_report
from ..index.build import BuildConfig, build_index
from ..index.layout import IndexManifest
from ..model.load import ModelSpec
from ..progress import Progress, no_progress
from ..query.run import QueryConfig, QueryResult, run_query
from .training import TrainConfig, TrainedModel, train_clip_on_world
from .world import (
    HardKind,
    World,
    WorldConfig,
    check_world_config,
    make_world,
    write_heldout_faces,
    write_labels,
)

DEMO_MARKER = "demo.json"


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("idia-demo")  # everything the demo writes goes here
    world: WorldConfig = field(default_factory=WorldConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    candidates: int = 1000  # candidate names: every identity of the world plus made-up names
    seed: int = 0  # seeds the world, the names, the training and the evaluation draws

    def __post_init__(self) -> None:
        """Every option is checked here, before the demo touches its folder (nothing is deleted for a bad one)."""
        check_whole_number("--seed", self.seed, 0)
        check_whole_number("candidates", self.candidates, 1, 10_000_000, "each is a name of the index")
        check_world_config(self.world)
        if self.candidates < self.world.identities:
            raise InputError(f"candidates ({self.candidates}) must be at least the world's identities "
                             f"({self.world.identities})")


# A small world for the tests: the same code, a fraction of the work (well under a minute on 2 cores).
SMALL_DEMO = dict(
    world=WorldConfig(identities=60, occurrence_levels=(1, 10, 25), heldout_photos=12, noise_pairs=200),
    train=TrainConfig(epochs=25, batch_size=128, lr=2e-3),
    candidates=300,
)


@dataclass(frozen=True)
class DemoResult:
    workdir: Path
    world: World
    model: TrainedModel
    index: IndexManifest
    query: QueryResult
    evaluation: EvalResult
    seconds: dict[str, float]


def _is_earlier_demo(work: Path) -> bool:
    """Whether work/demo.json is the marker a demo writes (a JSON object with its seed and world), not just
    any file of that name: the folder's faces/ and model/ are deleted on the strength of it."""
    try:
        marker = json.loads((work / DEMO_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(marker, dict) and isinstance(marker.get("seed"), int) and isinstance(marker.get("world"), dict) \
        and isinstance(marker.get("train"), dict)


def _claim_workdir(work: Path) -> None:
    """The demo owns its folder: an earlier demo there is replaced, anything else is refused."""
    if work.exists() and not work.is_dir():
        raise InputError(f"--workdir {work} exists and is not a directory")
    if work.is_dir() and any(work.iterdir()) and not _is_earlier_demo(work):
        raise ArtifactExistsError(f"--workdir {work} is not empty and holds no {DEMO_MARKER} of an earlier demo; "
                                  "choose an empty or new folder")
    for part in ("faces", "model"):  # regenerated from scratch; the index and report replace themselves
        shutil.rmtree(work / part, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)


def _padding_names(generated: list[str], world_names: list[str], seed: int) -> list[str]:
    """The generated names left after the world's, less any a namesake took, topped up to as many again."""
    taken = {n.casefold() for n in world_names}
    padding = [n for n in generated if n.casefold() not in taken]
    if len(padding) < len(generated):
        padding += generate_names(len(generated) - len(padding), seed=seed + 1,
                                  exclude=[*world_names, *generated]).names
    return padding


def run_demo(config: DemoConfig = DemoConfig(), progress: Progress = no_progress) -> DemoResult:
    work = Path(config.workdir)
    _claim_workdir(work)
    world_config = WorldConfig(**{**asdict(config.world), "seed": config.seed})
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    # 1. The world. The first names of the generated list are the world's people (a namesake's name is
    #    then made of a member's name part and one of their own), the rest pad the candidate set
    #    (made-up names nobody in the world has).
    generated = generate_names(config.candidates, seed=config.seed)
    world = make_world(world_config, generated.names[:world_config.identities],
                       [s.value for s in generated.sexes])
    world_names = [p.name for p in world.identities]
    padding = _padding_names(generated.names[world_config.identities:], world_names, config.seed)
    hard_counts = {kind.value: len(world.hard_non_members(kind)) for kind in (HardKind.LOOKALIKE, HardKind.NAMESAKE)}
    (work / DEMO_MARKER).write_text(json.dumps({"seed": config.seed, "world": asdict(world_config),
                                                "train": asdict(config.train), "candidates": config.candidates,
                                                "hard_non_members": hard_counts},
                                               indent=2, default=str) + "\n", encoding="utf-8")
    (work / "names.txt").write_text(f"# demo candidates: {world_config.identities} people of the world + "
                                    f"{config.candidates - world_config.identities} made-up names\n"
                                    + "\n".join([*world_names, *padding]) + "\n", encoding="utf-8")
    write_labels(world, work / "labels.csv")
    progress("write held-out photos", 0, 1)
    write_heldout_faces(world, work / "faces")
    progress("write held-out photos", 1, 1)
    seconds["world"] = time.perf_counter() - t

    # 2. Train a CLIP that has seen the members (and only them).
    t = time.perf_counter()
    train_config = TrainConfig(**{**asdict(config.train), "seed": config.seed})
    model = train_clip_on_world(world, work / "model", train_config, progress)
    seconds["train"] = time.perf_counter() - t

    # 3-5. The attack, as a user runs it.
    t = time.perf_counter()
    spec = ModelSpec(str(model.config_path), str(model.checkpoint_path))
    manifest = build_index(BuildConfig(names_file=work / "names.txt", index_dir=work / "index", model=spec,
                                       overwrite=True), progress)
    seconds["build_index"] = time.perf_counter() - t
    t = time.perf_counter()
    query = run_query(QueryConfig(index_dir=work / "index", faces_dir=work / "faces", out_dir=work / "report",
                                  labels_file=work / "labels.csv", seed=config.seed), progress)
    seconds["query"] = time.perf_counter() - t
    t = time.perf_counter()
    n_max = world_config.heldout_photos
    n_values = tuple(sorted({*range(1, n_max, 2), n_max} & set(range(1, 31))))
    evaluation = evaluate_report(work / "report", work / "labels.csv",
                                 EvalConfig(n_values=n_values, seed=config.seed, headline_n=min(30, n_max)), progress)
    seconds["evaluate"] = time.perf_counter() - t
    return DemoResult(work, world, model, manifest, query, evaluation, seconds)
