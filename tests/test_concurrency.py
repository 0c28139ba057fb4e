"""Processes and threads sharing one index and one embedding store.

Two real `idia-engine query` processes over the same index and store at once; many processes with many
threads reading one store; a reader table smaller than the threads that read. The CLI processes are forks
of a server that imported the engine once (tests/cli_processes.py): processes of their own, each with its
locks and LMDB reader slots, without an interpreter's start-up each.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import idia_engine.engine.query.store as store_mod
import numpy as np
import pytest
from idia_engine.cli.app import app
from idia_engine.engine.demo.faces import write_faces
from idia_engine.engine.query.images import collect_from_folder, hash_images
from idia_engine.engine.query.store import EmbeddingStore
from typer.testing import CliRunner

DIM = 32


def sha(i: int) -> str:
    return hashlib.sha256(f"img-{i}".encode()).hexdigest()


def embeddings(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- two query processes at once --------------------------------------------------------------------------


@pytest.mark.slow
def test_two_query_processes_share_index_and_store(tmp_path, world, tiny_model_files, cli_processes):
    config, ckpt = tiny_model_files
    idx = tmp_path / "idx"
    result = CliRunner().invoke(app, ["build-index", str(world["names_file"]), "--index-dir", str(idx),
                                      "--model", str(config), "--pretrained", str(ckpt), "-q"])
    assert result.exit_code == 0, result.output
    faces = tmp_path / "faces"
    write_faces(faces, world["people"][:6], images_per_person=40, seed=2, size=64)
    # The same photo twice (another file name, another person's folder too): one store entry.
    first = min((faces / world["people"][0].replace(" ", "_")).glob("*.png"))
    (faces / world["people"][1].replace(" ", "_") / "copy.png").write_bytes(first.read_bytes())
    shas, _ = hash_images([p for paths in collect_from_folder(faces).persons.values() for p in paths])
    distinct = set(shas)
    assert len(distinct) == len(shas) - 1

    def query(out: Path):
        return cli_processes.start("query", faces, "--index-dir", idx, "--out", out, "--workers", 2,
                                   "--batch-size", 16, "-q")

    outs = [tmp_path / "r1", tmp_path / "r2"]
    procs = [query(out) for out in outs]  # both started before either is waited for
    started = [time.monotonic()] * 2
    ended: list[float | None] = [None, None]
    both_alive_at_once = False
    deadline = time.monotonic() + 300
    while None in ended and time.monotonic() < deadline:
        alive = [p.poll() is None for p in procs]
        both_alive_at_once |= all(alive)
        for i, p in enumerate(procs):
            if ended[i] is None and not alive[i]:
                ended[i] = time.monotonic()
        time.sleep(0.02)
    outputs = []
    for p in procs:
        if p.poll() is None:
            p.kill()
        outputs.append("".join(p.communicate()))
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output
        assert "ReadersFullError" not in output and "Traceback" not in output
    assert both_alive_at_once and max(started) < min(ended), "the two queries did not overlap"

    assert (outs[0] / "persons.csv").read_bytes() == (outs[1] / "persons.csv").read_bytes()
    for f in ("modes.csv", "predictions/topk_ids.npy", "predictions/topk_scores.npy"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    summaries = [json.loads((out / "summary.json").read_text()) for out in outs]
    for out, s in zip(outs, summaries):
        assert s["counts"]["images_used"] == len(shas)
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else s["counts"]
        assert run["images_encoded"] + run["images_from_cache"] == len(distinct)
    # Whatever each process encoded itself, the store holds exactly one embedding per distinct image.
    runs = [json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else s["counts"]
            for out, s in zip(outs, summaries)]
    assert sum(r["images_encoded"] for r in runs) >= len(distinct)
    with EmbeddingStore(idx / "image-store") as s:
        with s.env.begin() as txn:
            [(meta_key, meta)] = [(bytes(k), json.loads(bytes(v))) for k, v in txn.cursor() if bytes(k)[:1] == b"m"]
        ns = s.namespace(meta_key[1:].hex(), meta["dim"], meta["dtype"])
        assert s.count(ns) == len(distinct)
        assert s.contains(ns, sorted(distinct)).all()


# --- many readers -----------------------------------------------------------------------------------------


def _reader_process(path: str, fp: str, n: int, threads: int, rounds: int) -> None:
    """Runs in a child: many threads, each with its own read transactions, all at once."""
    errors: list[BaseException] = []
    expected = embeddings(n)
    shas = [sha(i) for i in range(n)]
    with EmbeddingStore(Path(path)) as s:
        ns = s.namespace(fp, DIM)
        barrier = threading.Barrier(threads)

        def work(t: int) -> None:
            try:
                barrier.wait(60)
                for r in range(rounds):
                    lo = (t * 7 + r * 13) % n
                    rows = list(range(lo, min(n, lo + 50)))
                    np.testing.assert_array_equal(s.get_many(ns, [shas[i] for i in rows]), expected[rows])
                    assert s.contains(ns, shas[lo:lo + 5]).all()
                assert s.count(ns) == n
            except BaseException as e:  # noqa: BLE001 - reported through the exit code
                errors.append(e)
        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
    if errors:
        raise errors[0]


def _filled(path: Path, n: int) -> str:
    fp = hashlib.sha256(b"model").hexdigest()
    with EmbeddingStore(path) as s:
        s.put_many(s.namespace(fp, DIM), [sha(i) for i in range(n)], embeddings(n))
    return fp


def test_eight_processes_with_many_threads_read_one_store(tmp_path):
    path = tmp_path / "store"
    n = 400
    fp = _filled(path, n)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_reader_process, args=(str(path), fp, n, 32, 20)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * 8  # 256 threads: no ReadersFullError, right data
    with EmbeddingStore(path) as s:
        assert "no active readers" in s.env.readers()  # no reader slot is left behind by the children


def test_threads_wait_for_a_reader_slot(tmp_path, monkeypatch):
    """py-lmdb opens with MDB_NOTLS: each read transaction in flight takes a slot. A read that finds every slot
    taken waits for one instead of failing; more threads than slots all get the right data."""
    monkeypatch.setattr(store_mod, "_MAX_READERS", 4)  # the first opener sizes the reader table
    path = tmp_path / "store"
    n = 2000
    fp = _filled(path, n)
    waits = []
    with EmbeddingStore(path) as s:
        assert s.env.max_readers() == 4
        held = [s.env.begin() for _ in range(4)]  # every slot taken, for certain (no race to depend on)

        class SlotsFreeWhileWaiting:
            monotonic = staticmethod(time.monotonic)

            @staticmethod
            def sleep(seconds: float) -> None:
                waits.append(seconds)
                while held:
                    held.pop().abort()
        monkeypatch.setattr(store_mod, "time", SlotsFreeWhileWaiting)
        np.testing.assert_array_equal(s.get_many(s.namespace(fp, DIM), [sha(i) for i in range(50)]), embeddings(n)[:50])
    assert waits and not held  # the read waited, and was answered once slots came free
    monkeypatch.setattr(store_mod, "time", time)
    _reader_process(str(path), fp, n, 16, 10)  # 16 threads over 4 slots: each waits its turn, none fails


# --- build-index against running queries and builds -------------------------------------------------------


@pytest.fixture
def cli(cli_processes):
    """`idia-engine ARGS` in a process of its own: run to its end, or (wait=False) started and left running."""
    def run(*args, fault: str | None = None, wait: bool = True):
        env = {"IDIA_COMMIT_EVERY_S": "0"}
        return cli_processes.run(*args, fault=fault, env=env) if wait else \
            cli_processes.start(*args, fault=fault, env=env)
    return run


def _locked_by_someone(lock: Path) -> bool:
    import fcntl

    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _wait_for(condition, what: str, proc, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the process ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_query_during_build_index_overwrite_sees_the_old_index_whole(tmp_path, world, tiny_model_files, cli):
    config, ckpt = tiny_model_files
    idx = tmp_path / "idx"
    old_names, new_names = tmp_path / "old.txt", tmp_path / "new.txt"
    old_names.write_text("\n".join(world["names"][:30]) + "\n", encoding="utf-8")
    new_names.write_text("\n".join(world["names"][10:]) + "\n", encoding="utf-8")
    build = ["build-index", "--index-dir", idx, "--model", config, "--pretrained", ckpt, "-q"]
    assert cli(*build[:1], old_names, *build[1:]).returncode == 0
    old = json.loads((idx / "manifest.json").read_text())
    readers_lock = idx / old["data_dir"] / ".readers.lock"

    # The query opens the index, then waits (a fault point) with the old generation pinned until the
    # overwriting build has finished.
    go_on = tmp_path / "go-on"
    query = cli("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r", "--store", tmp_path / "s",
                 "-q", fault=f"query.index.opened:1:wait={go_on}", wait=False)
    _wait_for(lambda: _locked_by_someone(readers_lock), "the query to pin the old index", query)
    rebuilt = cli(*build[:1], new_names, *build[1:], "--overwrite")  # runs to the end meanwhile
    go_on.touch()
    assert rebuilt.returncode == 0, rebuilt.stderr
    new = json.loads((idx / "manifest.json").read_text())
    assert new["build_id"] != old["build_id"]
    assert (idx / old["data_dir"]).is_dir()  # kept: a query still reads it
    stdout, stderr = query.communicate(timeout=300)
    assert query.returncode == 0, stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["index"]["build_id"] == old["build_id"]  # the old index, whole: its names, its files
    candidates = (tmp_path / "r" / "predictions" / "candidates.txt").read_text(encoding="utf-8").splitlines()
    assert candidates == world["names"][:30]

    again = cli("query", world["faces"], "--index-dir", idx, "--out", tmp_path / "r2", "--store", tmp_path / "s",
                 "-q")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "r2" / "summary.json").read_text())["index"]["build_id"] == new["build_id"]
    # Nobody reads the old generation any more: the next build (here a no-op rerun) removes it.
    assert cli(*build[:1], new_names, *build[1:]).returncode == 0
    assert not (idx / old["data_dir"]).exists()


@pytest.mark.slow
def test_a_second_build_of_the_same_index_dir_is_refused_while_the_first_runs(tmp_path, world, tiny_model_files,
                                                                              cli):
    config, ckpt = tiny_model_files
    idx = tmp_path / "idx"
    build = ["build-index", world["names_file"], "--index-dir", idx, "--model", config, "--pretrained", ckpt,
             "--batch-size", 8, "-q"]
    go_on = tmp_path / "go-on"
    first = cli(*build, fault=f"build.encode.committed:1:wait={go_on}", wait=False)
    _wait_for(lambda: any(idx.glob(".build-*/progress.json")), "the first build to commit", first)
    second = cli(*build)
    go_on.touch()
    assert second.returncode == 1
    assert "in use by another process (pid" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr  # the first build was not disturbed
    assert cli(*build).returncode == 0  # and now the directory is free (a no-op: the same inputs)
