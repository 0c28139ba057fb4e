"""Shared fixtures: a tiny open_clip model saved as a user's checkpoint, and generated faces.

Nothing is downloaded: the hub is forced offline for the whole test session.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere
os.environ.setdefault("IDIA_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from idia_engine.engine.demo.faces import write_faces
from idia_engine.engine.demo.tiny_model import tiny_names, write_tiny_model  # noqa: E402
from idia_engine.engine.model.load import ModelSpec, load_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory) -> tuple[Path, Path]:
    """(model-config JSON, checkpoint) of the tiny CLIP, written like a user's files."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_files) -> ModelSpec:
    config, ckpt = tiny_model_files
    return ModelSpec(str(config), str(ckpt))


@pytest.fixture(scope="session")
def tiny_model(tiny_spec):
    return load_model(tiny_spec, "cpu", "fp32")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """40 candidate names; the first 5 have a faces folder with 4 photos each."""
    root = tmp_path_factory.mktemp("world")
    names = tiny_names(40, seed=1)
    (root / "names.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    people = names[:5]
    write_faces(root / "faces", people, images_per_person=4, seed=1, size=48)
    return {"root": root, "names": names, "people": people, "names_file": root / "names.txt",
            "faces": root / "faces"}


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """`idia-engine demo --small` run once for the session: (its workdir, what it printed). The world, the
    trained model, the index over its candidates, the report with labels and the held-out faces."""
    from idia_engine.cli.app import app
    from typer.testing import CliRunner

    work = tmp_path_factory.mktemp("demo") / "idia-demo"
    result = CliRunner().invoke(app, ["demo", "--small", "--workdir", str(work), "--quiet"])
    assert result.exit_code == 0, result.output
    return work, result.output


@pytest.fixture(scope="session")
def cli_processes(tmp_path_factory):
    """Starts real `idia-engine` processes, forked from a server that imported the engine once
    (tests/cli_processes.py): each has its own pid, environment and exit status, and dies by a real SIGKILL."""
    from cli_processes import CliProcesses

    return CliProcesses(tmp_path_factory.mktemp("cli-processes"))
