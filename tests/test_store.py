"""The LMDB image-embedding store: round trips, namespaces, persistence, map growth, refusals, two processes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

import idia_engine.engine.store as store_mod
from idia_engine.engine.errors import ArtifactError, ManifestMismatchError
from idia_engine.engine.store import STORE_ARTIFACT, STORE_MANIFEST, STORE_SCHEMA_VERSION, EmbeddingStore

DIM = 16
FP16_RTOL = 2.0 ** -11  # half of float16's machine epsilon: round-to-nearest relative error bound


def sha(i: int, salt: str = "img") -> str:
    """A 64-hex image hash."""
    return hashlib.sha256(f"{salt}-{i}".encode()).hexdigest()


def fingerprint(name: str) -> str:
    """A 64-hex model fingerprint."""
    return hashlib.sha256(f"model-{name}".encode()).hexdigest()


def embeddings(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """float32 [n, dim], L2-normalised rows, like the model's image embeddings."""
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def store(tmp_path):
    s = EmbeddingStore(tmp_path / "store")
    yield s
    s.close()


# --- round trips ------------------------------------------------------------------------------------------


def test_float32_round_trip_is_exact(store):
    ns = store.namespace(fingerprint("a"), DIM, "float32", model="tiny")
    x = embeddings(50)
    shas = [sha(i) for i in range(50)]
    store.put_many(ns, shas, x)
    out = store.get_many(ns, shas)
    assert out.dtype == np.float32 and out.shape == (50, DIM)
    np.testing.assert_array_equal(out, x)
    # Rows come back in the order asked, not in storage order.
    order = np.random.default_rng(1).permutation(50)
    np.testing.assert_array_equal(store.get_many(ns, [shas[i] for i in order]), x[order])


def test_float16_round_trip_within_fp16_tolerance(store):
    ns = store.namespace(fingerprint("a"), DIM, "float16")
    x = embeddings(50)
    shas = [sha(i) for i in range(50)]
    store.put_many(ns, shas, x)
    out = store.get_many(ns, shas)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x, rtol=FP16_RTOL, atol=2.0 ** -25)
    # Exactly what float16 rounding gives; and it was really stored as float16 (2 bytes a value).
    np.testing.assert_array_equal(out, x.astype(np.float16).astype(np.float32))
    with store.env.begin() as txn:
        assert len(txn.get(ns.key(shas[0]))) == DIM * 2


def test_contains_and_count(store):
    ns = store.namespace(fingerprint("a"), DIM)
    assert store.count(ns) == 0
    store.put_many(ns, [sha(i) for i in range(10)], embeddings(10))
    asked = [sha(3), sha(99), sha(0), sha(10), sha(9)]
    np.testing.assert_array_equal(store.contains(ns, asked), [True, False, True, False, True])
    assert store.contains(ns, []).shape == (0,)
    assert store.count(ns) == 10
    # Writing an image again replaces its embedding; the count does not grow.
    store.put_many(ns, [sha(3)], embeddings(1, seed=5))
    assert store.count(ns) == 10
    np.testing.assert_array_equal(store.get_many(ns, [sha(3)]), embeddings(1, seed=5))


def test_iter_embeddings_chunks_in_order(store):
    ns = store.namespace(fingerprint("a"), DIM)
    x = embeddings(30)
    shas = [sha(i) for i in range(30)]
    store.put_many(ns, shas, x)
    chunks = list(store.iter_embeddings(ns, shas, chunk=7))
    assert [start for start, _ in chunks] == [0, 7, 14, 21, 28]
    assert all(len(c) <= 7 for _, c in chunks)
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), x)
    [(start, whole)] = list(store.iter_embeddings(ns, shas, chunk=100))
    assert start == 0
    np.testing.assert_array_equal(whole, x)
    assert list(store.iter_embeddings(ns, [], chunk=7)) == []


def test_put_many_rejects_wrong_shape(store):
    ns = store.namespace(fingerprint("a"), DIM)
    with pytest.raises(ArtifactError, match=r"\(3, 16\)"):
        store.put_many(ns, [sha(i) for i in range(3)], embeddings(3, dim=DIM + 1))
    with pytest.raises(ArtifactError):
        store.put_many(ns, [sha(i) for i in range(3)], embeddings(2))
    assert store.count(ns) == 0


# --- namespaces -------------------------------------------------------------------------------------------


def test_namespaces_never_mix(store):
    a = store.namespace(fingerprint("a"), DIM)
    b = store.namespace(fingerprint("b"), DIM)
    c = store.namespace(fingerprint("c"), 8, "float16")
    shared = [sha(i) for i in range(5)]
    xa, xb, xc = embeddings(5, seed=1), embeddings(5, seed=2), embeddings(5, dim=8, seed=3)
    store.put_many(a, shared, xa)
    store.put_many(b, shared, xb)
    store.put_many(c, shared, xc)
    store.put_many(a, [sha(100)], embeddings(1, seed=4))  # only in a
    np.testing.assert_array_equal(store.get_many(a, shared), xa)
    np.testing.assert_array_equal(store.get_many(b, shared), xb)
    np.testing.assert_array_equal(store.get_many(c, shared), xc.astype(np.float16).astype(np.float32))
    assert (store.count(a), store.count(b), store.count(c)) == (6, 5, 5)
    assert not store.contains(b, [sha(100)])[0]
    with pytest.raises(ArtifactError):
        store.get_many(b, [sha(100)])


@pytest.mark.parametrize(("dim", "dtype"), [(DIM + 1, "float32"), (DIM, "float16"), (DIM - 1, "float16")])
def test_namespace_reregistered_differently_is_refused(store, dim, dtype):
    fp = fingerprint("a")
    ns = store.namespace(fp, DIM, "float32")
    assert store.namespace(fp, DIM, "float32") == ns  # the same registration again is fine
    with pytest.raises(ManifestMismatchError) as info:
        store.namespace(fp, dim, dtype)
    msg = str(info.value)
    assert f"float32[{DIM}]" in msg and f"{dtype}[{dim}]" in msg and fp[:12] in msg


def test_unknown_dtype_is_refused(store):
    with pytest.raises(ArtifactError, match="bfloat16"):
        store.namespace(fingerprint("a"), DIM, "bfloat16")


# --- persistence and the manifest -------------------------------------------------------------------------


def test_data_persists_after_reopen(tmp_path):
    path = tmp_path / "store"
    fp = fingerprint("a")
    x = embeddings(20)
    shas = [sha(i) for i in range(20)]
    with EmbeddingStore(path) as s:
        s.put_many(s.namespace(fp, DIM, model="tiny"), shas, x)
    manifest = path / STORE_MANIFEST
    assert manifest.is_file()
    before = manifest.read_text(encoding="utf-8")
    meta = json.loads(before)
    assert meta["schema_version"] == STORE_SCHEMA_VERSION
    assert meta["artifact"] == STORE_ARTIFACT
    assert meta["created_at"] and meta["key_format"] and "numpy" in meta["library_versions"]
    with EmbeddingStore(path) as s:
        ns = s.namespace(fp, DIM)
        assert s.count(ns) == 20
        np.testing.assert_array_equal(s.get_many(ns, shas), x)
        with pytest.raises(ManifestMismatchError):  # the namespace record persisted too
            s.namespace(fp, DIM, "float16")
    assert manifest.read_text(encoding="utf-8") == before  # reopening does not rewrite the manifest


def test_map_grows_when_full(tmp_path, monkeypatch):
    small = 1 << 17  # 128 KiB: 32 pages
    monkeypatch.setattr(store_mod, "_INITIAL_MAP_SIZE", small)
    path = tmp_path / "store"
    dim = 64
    batches = [(list(range(i * 500, (i + 1) * 500)), embeddings(500, dim, seed=i)) for i in range(3)]
    big = (list(range(10_000, 13_000)), embeddings(3000, dim, seed=9))  # ~770 KiB: several doublings at once
    with EmbeddingStore(path) as s:
        ns = s.namespace(fingerprint("a"), dim)
        assert s.env.info()["map_size"] == small
        for ids, x in batches + [big]:
            s.put_many(ns, [sha(i) for i in ids], x)
        assert s.env.info()["map_size"] > small
        assert s.count(ns) == 4500
        for ids, x in batches + [big]:
            np.testing.assert_array_equal(s.get_many(ns, [sha(i) for i in ids]), x)
    with EmbeddingStore(path) as s:  # reopened with the tiny initial size still asked for
        ns = s.namespace(fingerprint("a"), dim)
        assert s.count(ns) == 4500
        for ids, x in batches + [big]:
            np.testing.assert_array_equal(s.get_many(ns, [sha(i) for i in ids]), x)
        more = list(range(20_000, 23_000))
        s.put_many(ns, [sha(i) for i in more], embeddings(3000, dim, seed=10))  # and grows again if needed
        np.testing.assert_array_equal(s.get_many(ns, [sha(i) for i in more]), embeddings(3000, dim, seed=10))
        assert s.count(ns) == 7500


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    {"notes.txt": "my holiday photos"},
    {STORE_MANIFEST: "{not json"},
    {STORE_MANIFEST: json.dumps({"artifact": "something else", "schema_version": STORE_SCHEMA_VERSION})},
    {STORE_MANIFEST: json.dumps({"artifact": STORE_ARTIFACT, "schema_version": STORE_SCHEMA_VERSION + 1})},
    {STORE_MANIFEST: "[1, 2]"},
], ids=["foreign-file", "bad-json", "other-artifact", "other-schema", "manifest-not-an-object"])
def test_directory_that_is_not_a_store_is_refused(tmp_path, content):
    path = tmp_path / "somewhere"
    path.mkdir()
    for name, text in content.items():
        (path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ArtifactError, match="somewhere"):
        EmbeddingStore(path)
    assert sorted(p.name for p in path.iterdir()) == sorted(content)  # nothing was written into it


def test_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "store"
    path.write_bytes(b"not a directory")
    with pytest.raises(ArtifactError, match="not a directory"):
        EmbeddingStore(path)


def test_missing_embedding_names_the_image(store):
    ns = store.namespace(fingerprint("a"), DIM)
    store.put_many(ns, [sha(0)], embeddings(1))
    missing = sha(1)
    with pytest.raises(ArtifactError) as info:
        store.get_many(ns, [sha(0), missing])
    assert missing[:16] in str(info.value)
    assert sha(0)[:16] not in str(info.value)


# --- two processes ----------------------------------------------------------------------------------------


def _child_write(path: str, fp: str, start: int, n: int, seed: int, map_size: int | None) -> None:
    """Runs in a spawned process: open the store, check what the parent wrote, add a batch, close."""
    if map_size is not None:
        store_mod._INITIAL_MAP_SIZE = map_size
    with EmbeddingStore(Path(path)) as s:
        ns = s.namespace(fp, DIM)
        assert s.count(ns) >= 1, "the parent's data is not visible to the child"
        s.put_many(ns, [sha(i) for i in range(start, start + n)], embeddings(n, seed=seed))


def _run_child(*args) -> None:
    proc = multiprocessing.get_context("spawn").Process(target=_child_write, args=args)
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("child process hung")
    assert proc.exitcode == 0, f"child process failed with exit code {proc.exitcode}"


def test_second_process_writes_while_first_holds_the_store(store):
    fp = fingerprint("a")
    ns = store.namespace(fp, DIM)
    store.put_many(ns, [sha(i) for i in range(10)], embeddings(10, seed=1))
    old = store.env.begin()  # a read snapshot held open across the child's write
    try:
        _run_child(str(store.path), fp, 1000, 40, 2, None)
        assert old.get(ns.key(sha(1000))) is None  # the old snapshot does not see the new batch
    finally:
        old.abort()
    np.testing.assert_array_equal(store.get_many(ns, [sha(i) for i in range(1000, 1040)]), embeddings(40, seed=2))
    np.testing.assert_array_equal(store.get_many(ns, [sha(i) for i in range(10)]), embeddings(10, seed=1))
    assert store.count(ns) == 50
    store.put_many(ns, [sha(5000)], embeddings(1, seed=3))  # and the parent can still write
    assert store.count(ns) == 50 + 1


def test_first_process_survives_the_second_growing_the_map(tmp_path, monkeypatch):
    small = 1 << 17
    monkeypatch.setattr(store_mod, "_INITIAL_MAP_SIZE", small)
    fp = fingerprint("a")
    with EmbeddingStore(tmp_path / "store") as s:
        ns = s.namespace(fp, DIM)
        s.put_many(ns, [sha(0)], embeddings(1))
        _run_child(str(s.path), fp, 1000, 4000, 2, small)  # ~320 KiB: the child must grow the map
        np.testing.assert_array_equal(s.get_many(ns, [sha(i) for i in range(1000, 5000)]), embeddings(4000, seed=2))
        s.put_many(ns, [sha(1)], embeddings(1, seed=3))
        assert s.count(ns) == 4002
