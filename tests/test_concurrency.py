"""Processes and threads sharing one index and one embedding store (issue 5).

Two real `idia-engine query` processes over the same index and store at once; many processes with many
threads reading one store; a reader table smaller than the threads that read.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import idia_engine.engine.store as store_mod
import numpy as np
import pytest
from idia_engine.cli.app import app
from idia_engine.engine.images import collect_from_folder, hash_images
from idia_engine.engine.store import EmbeddingStore
from idia_engine.engine.synthetic import write_faces
from typer.testing import CliRunner

DIM = 32


def sha(i: int) -> str:
    return hashlib.sha256(f"img-{i}".encode()).hexdigest()


def embeddings(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- two query processes at once --------------------------------------------------------------------------


@pytest.mark.slow
def test_two_query_processes_share_index_and_store(tmp_path, world, tiny_model_files):
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

    def query(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "idia_engine.cli.app", "query", str(faces), "--index-dir", str(idx),
             "--out", str(out), "--workers", "2", "--batch-size", "16", "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "IDIA_OFFLINE": "1"})

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
        outputs.append(p.communicate()[0].decode(errors="replace"))
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
    """py-lmdb opens with MDB_NOTLS: each read transaction in flight takes a slot. More threads than slots wait."""
    monkeypatch.setattr(store_mod, "_MAX_READERS", 4)  # the first opener sizes the reader table
    path = tmp_path / "store"
    n = 2000
    fp = _filled(path, n)
    with EmbeddingStore(path) as s:
        assert s.env.max_readers() == 4
    waits = []

    class CountingTime:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            waits.append(seconds)
            time.sleep(seconds)
    monkeypatch.setattr(store_mod, "time", CountingTime)
    _reader_process(str(path), fp, n, 16, 10)
    assert waits, "the reader table never filled up: the test proves nothing"
