"""`build-index --ray`: prompts encoded on Ray actors give the index a single-process build gives.

One local Ray (2 CPUs, 2 actors of one thread each) serves the module: a build on it writes the same bytes
as a build in this process, resumes a build this process left half done, and its errors are one line.
The actor planning (GPUs, CPUs, --ray-actors) is checked against made-up cluster resources, GPU included.
"""

from __future__ import annotations

import json
from pathlib import Path

import idia_engine.engine.index.encode as index_encode
import pytest
from idia_engine.cli.app import app
from idia_engine.engine.demo.tiny_model import tiny_names
from idia_engine.engine.errors import InputError
from idia_engine.engine.index.build import BuildConfig, build_index
from idia_engine.engine.index.ray_encode import ActorSetup, RayPromptEncoders, actor_plan
from idia_engine.engine.model.load import DeviceChoice, Precision
from typer.testing import CliRunner

TEMPLATES = ("a photo of {0}", "{0} on stage", "a portrait of {0}")
BATCH = 32
# What differs between any two builds of the same inputs, and what says where the prompts were encoded.
PER_BUILD = {"build_id", "data_dir", "created_at", "manifest_sha256"}
PER_RUN_ENCODE = {"seconds", "prompts_per_second", "index_seconds", "resumed", "prompts_reused", "device", "ray"}


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def names_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray-names") / "names.txt"
    path.write_text("\n".join(tiny_names(150, seed=5)) + "\n", encoding="utf-8")  # 5 batches per template
    return path


def config(names_file: Path, index_dir: Path, spec, **kw) -> BuildConfig:
    return BuildConfig(names_file=names_file, index_dir=index_dir, model=spec, templates=TEMPLATES,
                       index_kind=kw.pop("index_kind", "flat"), batch_size=BATCH, **kw)


def content(index_dir: Path) -> tuple[dict, dict[str, bytes]]:
    manifest = json.loads((index_dir / "manifest.json").read_text(encoding="utf-8"))
    files = {f: (index_dir / manifest["data_dir"] / f).read_bytes() for f in manifest["files"]}
    core = {k: v for k, v in manifest.items() if k not in PER_BUILD}
    core["encode"] = {k: v for k, v in manifest["encode"].items() if k not in PER_RUN_ENCODE}
    return core, files


@pytest.fixture(scope="module")
def single_process(names_file, tiny_spec, tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The same inputs built in this process, as flat and as IVF (raw vectors kept beside the index)."""
    root = tmp_path_factory.mktemp("single")
    for kind in ("flat", "IVF4,Flat"):
        build_index(config(names_file, root / kind, tiny_spec, index_kind=kind), model=tiny_model)
    return {kind: root / kind for kind in ("flat", "IVF4,Flat")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "IVF4,Flat"])
def test_actors_write_the_bytes_of_a_single_process_build(local_ray, names_file, tiny_spec, tiny_model,
                                                          single_process, tmp_path, kind):
    manifest = build_index(config(names_file, tmp_path / "idx", tiny_spec, index_kind=kind, ray="local",
                                  ray_actors=2), model=tiny_model)
    assert manifest.encode["device"] == "ray:cpu"
    assert manifest.encode["ray"] == {"address": "local", "actors": 2, "device": "cpu", "threads_per_actor": 1,
                                      "nodes": 1}
    core, files = content(tmp_path / "idx")
    ref_core, ref_files = content(single_process[kind])
    assert core == ref_core  # build key included: the same build, wherever it was encoded
    assert files.keys() == ref_files.keys() and len(files) > len(TEMPLATES)
    for name in files:
        assert files[name] == ref_files[name], name


class StopsAfter:
    """The tiny model, raising KeyboardInterrupt (as Ctrl-C would) after `batches` forward passes."""

    def __init__(self, model, batches: int):
        self._model, self._left = model, batches

    def encode_text(self, prompts):
        if self._left == 0:
            raise KeyboardInterrupt
        self._left -= 1
        return self._model.encode_text(prompts)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.mark.slow
def test_actors_resume_a_build_this_process_left_half_done(local_ray, names_file, tiny_spec, tiny_model,
                                                           single_process, tmp_path, monkeypatch):
    monkeypatch.setattr(index_encode, "COMMIT_EVERY_S", 0.0)  # a commit after every batch
    idx = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):  # template 0 done (5 batches), 2 batches of template 1
        build_index(config(names_file, idx, tiny_spec), model=StopsAfter(tiny_model, 7))
    [build_dir] = idx.glob(".build-*")
    assert json.loads((build_dir / "progress.json").read_text())["rows"] == [150, 64, 0]
    manifest = build_index(config(names_file, idx, tiny_spec, ray="local", ray_actors=2), model=tiny_model)
    assert manifest.encode["prompts_reused"] == 150 + 64  # the actors encoded only the rest
    core, files = content(idx)
    ref_core, ref_files = content(single_process["flat"])
    assert core == ref_core and files == ref_files


@pytest.mark.slow
def test_the_cli_builds_on_ray_and_says_where(local_ray, names_file, tiny_model_files, single_process, tmp_path):
    model_config, ckpt = tiny_model_files
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["build-index", str(names_file), "--index-dir", str(tmp_path / "idx"),
                                      "--model", str(model_config), "--pretrained", str(ckpt), "--templates",
                                      str(templates), "--index", "flat", "--batch-size", str(BATCH), "--ray", "local",
                                      "-q"])
    assert result.exit_code == 0, result.output
    assert "on ray:cpu (fp32)" in result.output
    ray_setup = json.loads((tmp_path / "idx" / "manifest.json").read_text())["encode"]["ray"]
    assert (ray_setup["actors"], ray_setup["threads_per_actor"]) == (1, 2)  # this process's 2 threads
    assert content(tmp_path / "idx")[1] == content(single_process["flat"])[1]


@pytest.mark.parametrize("argv, message", [
    (["--ray", "127.0.0.1:1"], r"cannot reach a Ray cluster at 127\.0\.0\.1:1"),
    (["--ray", "nonsense"], r"--ray 'nonsense' is not host:port"),
    (["--ray-actors", "2"], r"--ray-actors needs --ray ADDRESS"),
    (["--ray", "local", "--ray-actors", "-1"], r"--ray-actors"),
])
def test_bad_ray_options_are_one_line_and_write_nothing(names_file, tiny_model_files, tmp_path, argv, message):
    import re

    model_config, ckpt = tiny_model_files
    idx = tmp_path / "idx"
    result = CliRunner().invoke(app, ["build-index", str(names_file), "--index-dir", str(idx), "--model",
                                      str(model_config), "--pretrained", str(ckpt), *argv])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output) and len(result.output.strip().splitlines()) == 1, result.output
    assert not idx.exists()


def test_actors_are_planned_from_the_cluster_resources():
    # CPUs: by default actors with this machine's thread count (the same float32 sums), as many as fit.
    assert actor_plan(8, 0, DeviceChoice.AUTO, 0, threads=2) == ("cpu", 4, 2)
    assert actor_plan(8, 0, DeviceChoice.AUTO, 0, threads=1) == ("cpu", 8, 1)
    assert actor_plan(2, 0, DeviceChoice.AUTO, 0, threads=16) == ("cpu", 1, 2)
    assert actor_plan(8, 0, DeviceChoice.AUTO, 2, threads=1) == ("cpu", 2, 4)  # --ray-actors shares the CPUs
    assert actor_plan(64, 4, DeviceChoice.AUTO, 0, threads=2) == ("cuda", 4, 1)  # one actor per GPU
    assert actor_plan(64, 4, DeviceChoice.CPU, 0, threads=2) == ("cpu", 32, 2)  # --device cpu keeps off the GPUs
    with pytest.raises(InputError, match="--device cuda with --ray: the Ray cluster has no GPU"):
        actor_plan(8, 0, DeviceChoice.CUDA, 0, threads=2)
    with pytest.raises(InputError, match="has 4 GPU"):
        actor_plan(64, 4, DeviceChoice.AUTO, 5, threads=2)
    with pytest.raises(InputError, match="has 8 CPU"):
        actor_plan(8, 0, DeviceChoice.AUTO, 9, threads=2)


def test_actors_that_disagree_or_loaded_other_weights_are_refused(tiny_model):
    encoders = RayPromptEncoders("local", 2, None, Precision.FP32, DeviceChoice.CPU, [], BATCH)
    same = ActorSetup("cpu", "fp32", "fast", tiny_model.info.fingerprint, 1, "node-a")
    encoders.setups = [same, ActorSetup("cpu", "fp32", "fast", tiny_model.info.fingerprint, 1, "node-b")]
    encoders.actors = [object(), object()]
    encoders.check_weights(tiny_model)  # two nodes, one setup: fine
    assert encoders.describe()["nodes"] == 2
    encoders.setups = [same, ActorSetup("cpu", "bf16", "fast", tiny_model.info.fingerprint, 1, "node-b")]
    with pytest.raises(InputError, match="Ray actors encode differently.*precision"):
        encoders.setup
    encoders.setups = [ActorSetup("cpu", "fp32", "fast", "0" * 64, 1, "node-a")]
    with pytest.raises(InputError, match="loaded other weights than this machine"):
        encoders.check_weights(tiny_model)
