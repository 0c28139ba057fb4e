"""kill -9 at chosen moments of build-index and query (real processes, real SIGKILL).

After each kill, the rerun with the same arguments must finish, reuse what the killed run committed (no
prompt or image batch encoded twice), and write the same bytes as a run that was never interrupted. The
moments are fault points (engine/faults.py: IDIA_FAULT=<point>:<n>:kill makes the process SIGKILL
itself there); one test also kills from outside at whatever moment the build has reached. The processes
are forks of a server that imported the engine once (tests/cli_processes.py), not new interpreters: each
is still a process of its own, with its own environment, and dies by a real SIGKILL.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from idia_engine.engine.demo.faces import write_faces
from idia_engine.engine.demo.tiny_model import tiny_names

pytestmark = pytest.mark.slow

TEMPLATES = ["a photo of {0}", "{0} at a gala", "an image of {0}", "{0} smiling", "a portrait of {0}"]
NAMES = 120  # x 5 templates, in batches of 32: 4 batches per template, a commit after each
BUILD_BATCH = 32
QUERY_BATCH = 4  # 6 persons x 5 images (+2 undecodable files): 8 encode batches


ENV = {"IDIA_COMMIT_EVERY_S": "0", "OMP_NUM_THREADS": "1"}  # a commit after every batch


@pytest.fixture(scope="module")
def run_cli(cli_processes):
    """`idia-engine ARGS` in a process of its own; `fault` asks it to SIGKILL itself at a fault point."""
    def run(*args, fault: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = cli_processes.run(*args, fault=fault, env=ENV)
        if check:
            assert proc.returncode == 0, proc.stderr[-3000:]
        return proc
    return run


def killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_files, run_cli):
    root = tmp_path_factory.mktemp("crash")
    names = tiny_names(NAMES, seed=3)
    (root / "names.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    write_faces(root / "faces", names[:6], images_per_person=5, seed=3, size=40)
    first = sorted((root / "faces").iterdir())[0]
    (first / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # does not decode
    (first / "zz_notes.txt").write_text("not an image", encoding="utf-8")
    config, ckpt = tiny_model_files
    build = ["build-index", root / "names.txt", "--model", config, "--pretrained", ckpt, "--templates",
             root / "templates.txt", "--batch-size", BUILD_BATCH, "--index", "flat", "-q"]
    ref_idx = root / "ref-index"
    run_cli(*build, "--index-dir", ref_idx)
    query = ["query", root / "faces", "--index-dir", ref_idx, "--batch-size", QUERY_BATCH, "--top-k", 5, "-q"]
    ref_report = root / "ref-report"
    run_cli(*query, "--out", ref_report, "--store", root / "ref-store")
    return {"root": root, "build": build, "query": query, "ref_idx": ref_idx, "ref_report": ref_report}


# --- comparing outputs -------------------------------------------------------------------------------

RUN_SPECIFIC = {"build_id", "data_dir", "created_at", "manifest_sha256"}  # differ between any two builds
RUN_SPECIFIC_ENCODE = {"seconds", "prompts_per_second", "index_seconds", "resumed", "prompts_reused"}


def manifest(idx: Path) -> dict:
    return json.loads((idx / "manifest.json").read_text(encoding="utf-8"))


def index_content(idx: Path) -> tuple[dict, dict]:
    """(manifest without what differs per build, {data file: bytes})."""
    m = manifest(idx)
    files = {name: (idx / m["data_dir"] / name).read_bytes() for name in m["files"]}
    core = {k: v for k, v in m.items() if k not in RUN_SPECIFIC}
    core["encode"] = {k: v for k, v in m["encode"].items() if k not in RUN_SPECIFIC_ENCODE}
    return core, files


def report_content(report: Path) -> dict[str, bytes]:
    """Every file of a report but run.json (this run's timings), as bytes."""
    return {p.relative_to(report).as_posix(): p.read_bytes() for p in sorted(report.rglob("*"))
            if p.is_file() and p.name != "run.json"}


def assert_same_index(idx: Path, ref: Path) -> None:
    core, files = index_content(idx)
    ref_core, ref_files = index_content(ref)
    assert core == ref_core
    assert files.keys() == ref_files.keys()
    for name in files:
        assert files[name] == ref_files[name], name


def committed_prompts(idx: Path) -> int:
    (build_dir,) = [p for p in idx.iterdir() if p.name.startswith(".build-")]
    return sum(json.loads((build_dir / "progress.json").read_text())["rows"])


def uninterrupted_report(run_cli, setup, tmp_path: Path, store: Path) -> dict[str, bytes]:
    """The report of an uninterrupted run with the same arguments (the store path is one of them),
    from an empty store, which is then removed again."""
    run_cli(*setup["query"], "--out", tmp_path / "uninterrupted", "--store", store)
    shutil.rmtree(store)
    return report_content(tmp_path / "uninterrupted")


def no_temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --- build-index -------------------------------------------------------------------------------------

@pytest.mark.parametrize("point, hit", [
    ("build.encode.committed", 6),   # template 1, second batch: some of a template's rows on disk
    ("build.template.indexed", 2),   # two templates encoded and indexed
])
def test_build_killed_while_encoding_resumes_and_matches(run_cli, setup, tmp_path, point, hit):
    idx = tmp_path / "idx"
    proc = run_cli(*setup["build"], "--index-dir", idx, fault=f"{point}:{hit}:kill", check=False)
    assert killed(proc), proc.stderr[-2000:]
    assert not (idx / "manifest.json").exists()
    committed = committed_prompts(idx)
    assert 0 < committed < NAMES * len(TEMPLATES)
    # What a kill in the middle of an atomic write leaves: its temporary file (the rerun must drop it).
    (build_dir,) = idx.glob(".build-*")
    (build_dir / ".progress.json.tmp-0000dead").write_text('{"key": "half-writ', encoding="utf-8")
    run_cli(*setup["build"], "--index-dir", idx)
    assert manifest(idx)["encode"]["prompts_reused"] == committed  # nothing committed was encoded again
    assert_same_index(idx, setup["ref_idx"])
    assert sorted(p.name for p in idx.iterdir()) == sorted([".build.lock", "manifest.json",
                                                            f"data-{manifest(idx)['build_id']}"])


def test_build_killed_between_publishing_and_the_manifest(run_cli, setup, tmp_path):
    idx = tmp_path / "idx"
    proc = run_cli(*setup["build"], "--index-dir", idx, fault="build.data.published:1:kill", check=False)
    assert killed(proc)
    (data,) = [p for p in idx.iterdir() if p.name.startswith("data-")]
    assert not (idx / "manifest.json").exists()
    bad = run_cli(*setup["query"][:2], "--index-dir", idx, "--out", tmp_path / "r", check=False)
    assert bad.returncode == 1 and "holds no manifest.json" in bad.stderr  # no half index is ever used
    rerun = run_cli(*setup["build"], "--index-dir", idx, "-v")
    assert "found the finished build" in rerun.stderr  # published data adopted, nothing encoded again
    assert manifest(idx)["data_dir"] == data.name
    assert_same_index(idx, setup["ref_idx"])


def test_build_killed_after_the_manifest_reruns_as_a_no_op(run_cli, setup, tmp_path):
    idx = tmp_path / "idx"
    proc = run_cli(*setup["build"], "--index-dir", idx, fault="build.manifest.written:1:kill", check=False)
    assert killed(proc)
    build_id = manifest(idx)["build_id"]
    (idx / ".manifest.json.tmp-0000dead").write_text("{", encoding="utf-8")  # a manifest write cut short
    rerun = run_cli(*setup["build"], "--index-dir", idx, "-v")
    assert "already holds this build" in rerun.stderr
    assert manifest(idx)["build_id"] == build_id
    assert not (idx / ".manifest.json.tmp-0000dead").exists()
    assert_same_index(idx, setup["ref_idx"])
    other = setup["root"] / "other-names.txt"
    other.write_text("Ada Lovelace\nAlan Turing\n", encoding="utf-8")
    args = [other if a == setup["build"][1] else a for a in setup["build"]]
    refused = run_cli(*args, "--index-dir", idx, check=False)  # other inputs still need --overwrite
    assert refused.returncode == 2 and "--overwrite" in refused.stderr


def test_overwrite_killed_midway_keeps_the_old_index(run_cli, setup, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(setup["ref_idx"], idx)
    old = manifest(idx)["build_id"]
    other = tmp_path / "names2.txt"
    other.write_text("\n".join(tiny_names(NAMES, seed=4)) + "\n", encoding="utf-8")
    args = [other if a == setup["build"][1] else a for a in setup["build"]]
    proc = run_cli(*args, "--index-dir", idx, "--overwrite", fault="build.encode.committed:3:kill", check=False)
    assert killed(proc)
    assert manifest(idx)["build_id"] == old
    run_cli(*setup["query"][:2], "--index-dir", idx, "--out", tmp_path / "r", "--store", tmp_path / "s", "-q")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["index"]["build_id"] == old


def test_build_killed_from_outside_at_any_moment(run_cli, cli_processes, setup, tmp_path):
    """No fault point: SIGKILL from outside as soon as some rows are committed, wherever the build is."""
    idx = tmp_path / "idx"
    proc = cli_processes.start(*setup["build"], "--index-dir", idx, env={"IDIA_COMMIT_EVERY_S": "0"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name == "progress.json" for p in idx.glob(".build-*/*")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed mid-build, not after it had finished
    run_cli(*setup["build"], "--index-dir", idx)
    assert_same_index(idx, setup["ref_idx"])


# --- query -------------------------------------------------------------------------------------------

def test_query_killed_while_encoding_resumes_and_matches(run_cli, setup, tmp_path):
    out, store = tmp_path / "r", tmp_path / "store"
    expected = uninterrupted_report(run_cli, setup, tmp_path, store)
    proc = run_cli(*setup["query"], "--out", out, "--store", store, fault="query.encode.committed:3:kill",
                   check=False)
    assert killed(proc)
    assert not out.exists() and no_temporaries(tmp_path) == []  # nothing reported yet, nothing half-written
    run_cli(*setup["query"], "--out", out, "--store", store)
    run = json.loads((out / "run.json").read_text())
    # Three committed batches of 4 were reused; the two undecodable files were remembered, not retried.
    assert run["images_from_cache"] + run["undecodable_from_store"] == 3 * QUERY_BATCH
    assert run["images_encoded"] + run["images_from_cache"] == 30
    assert report_content(out) == expected
    assert no_temporaries(tmp_path) == []


@pytest.mark.parametrize("point", ["query.search.chunk:2", "query.report.staged:1"])
def test_query_killed_after_encoding_keeps_the_old_report_and_matches_on_rerun(run_cli, setup, tmp_path, point):
    out, store = tmp_path / "r", tmp_path / "store"
    expected = uninterrupted_report(run_cli, setup, tmp_path, store)
    shutil.copytree(setup["ref_report"], out)  # an earlier report: it must stay whole
    (out / "persons.csv").write_text("an earlier report\n", encoding="utf-8")
    earlier = report_content(out)
    proc = run_cli(*setup["query"], "--out", out, "--store", store, fault=f"{point}:kill", check=False)
    assert killed(proc)
    assert report_content(out) == earlier
    run_cli(*setup["query"], "--out", out, "--store", store)
    assert json.loads((out / "run.json").read_text())["images_encoded"] == 0  # all of it was committed
    assert report_content(out) == expected
    assert no_temporaries(tmp_path) == []  # the killed run's staging directory was cleaned up


def test_same_inputs_and_seed_give_identical_reports(run_cli, setup, tmp_path):
    def args(seed: int) -> list:
        return [*setup["query"], "--images-per-person", 3, "--seed", seed, "--store", tmp_path / "store"]
    run_cli(*args(11), "--out", tmp_path / "a")
    shutil.rmtree(tmp_path / "store")  # encode everything again, from scratch
    run_cli(*args(11), "--out", tmp_path / "a2")
    a, a2 = report_content(tmp_path / "a"), report_content(tmp_path / "a2")
    assert a.keys() == a2.keys() and {"summary.json", "persons.csv"} <= a.keys()
    for name in a:
        assert a[name] == a2[name], name
    run_cli(*args(12), "--out", tmp_path / "b")
    assert report_content(tmp_path / "b")["predictions/images.csv"] != a["predictions/images.csv"]
