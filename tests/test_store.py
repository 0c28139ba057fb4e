"""The LMDB image-embedding store: round trips, namespaces, persistence, map growth, refusals, decode
failures, read-only locations, forked and spawned processes, two processes growing the map."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import re
from pathlib import Path

import idia_engine.engine.query.store as store_mod
import lmdb
import numpy as np
import pytest
from idia_engine.engine.errors import ArtifactError, ManifestMismatchError
from idia_engine.engine.query.store import (
    STORE_ARTIFACT,
    STORE_MANIFEST,
    STORE_SCHEMA_VERSION,
    EmbeddingStore,
    StoreReadOnlyError,
)

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


# --- decode failures recorded with their batch ------------------------------------------------------------


def test_failures_are_committed_with_the_batch(store):
    ns = store.namespace(fingerprint("a"), DIM)
    shas = [sha(i) for i in range(4)]
    bad = {sha(100): "not a decodable image (UnidentifiedImageError: cannot identify)", sha(101): "décodage raté ✗"}
    store.put_many(ns, shas, embeddings(4), failures=bad)
    np.testing.assert_array_equal(store.get_many(ns, shas), embeddings(4))
    assert store.failures(ns, [sha(101), sha(0), sha(100), sha(999)]) == {sha(101): bad[sha(101)],
                                                                           sha(100): bad[sha(100)]}
    assert store.failures(ns, []) == {}
    assert store.count(ns) == 4  # markers are not embeddings
    assert not store.contains(ns, list(bad)).any()
    # The markers are the documented keys, in the same namespace only.
    with store.env.begin() as txn:
        assert bytes(txn.get(b"x" + bytes.fromhex(ns.fingerprint) + bytes.fromhex(sha(100)))).decode() == bad[sha(100)]
    other = store.namespace(fingerprint("b"), DIM)
    assert store.failures(other, list(bad)) == {}


def test_failures_without_embeddings(store):
    ns = store.namespace(fingerprint("a"), DIM)
    store.put_many(ns, [], None, failures={sha(1): "empty"})
    store.put_many(ns, [], np.zeros((0, DIM), np.float32), failures={sha(2): "truncated"})
    store.put_many(ns, [], np.zeros((0,), np.float32), failures={sha(3): "bomb"})
    store.put_many(ns, [], None)  # nothing at all: nothing happens
    assert store.failures(ns, [sha(i) for i in range(5)]) == {sha(1): "empty", sha(2): "truncated", sha(3): "bomb"}
    assert store.count(ns) == 0
    with pytest.raises(ArtifactError):
        store.put_many(ns, [sha(4)], None)


def test_failure_and_embedding_of_one_image(store):
    ns = store.namespace(fingerprint("a"), DIM)
    with pytest.raises(ArtifactError, match=sha(0)[:16]):
        store.put_many(ns, [sha(0)], embeddings(1), failures={sha(0): "both?"})
    assert store.failures(ns, [sha(0)]) == {} and store.count(ns) == 0  # nothing of it was written
    with pytest.raises(ArtifactError, match="string"):
        store.put_many(ns, [], None, failures={sha(0): 3})
    store.put_many(ns, [], None, failures={sha(0): "did not decode"})
    store.put_many(ns, [sha(0)], embeddings(1))  # decoded after all (a newer Pillow): the marker goes
    assert store.failures(ns, [sha(0)]) == {}
    np.testing.assert_array_equal(store.get_many(ns, [sha(0)]), embeddings(1))


def test_failures_persist_and_key_format_documents_them(tmp_path):
    path = tmp_path / "store"
    with EmbeddingStore(path) as s:
        ns = s.namespace(fingerprint("a"), DIM)
        s.put_many(ns, [sha(0)], embeddings(1), failures={sha(1): "bad"})
    with EmbeddingStore(path) as s:
        ns = s.namespace(fingerprint("a"), DIM)
        assert s.failures(ns, [sha(0), sha(1)]) == {sha(1): "bad"}
    key_format = json.loads((path / STORE_MANIFEST).read_text(encoding="utf-8"))["key_format"]
    assert "b'x'" in key_format and "b'e'" in key_format and "b'm'" in key_format
    assert json.loads((path / STORE_MANIFEST).read_text())["schema_version"] == 1


# --- read-only locations ----------------------------------------------------------------------------------


def _filled_store(path: Path) -> tuple[str, list[str], np.ndarray]:
    fp = fingerprint("a")
    shas = [sha(i) for i in range(8)]
    x = embeddings(8)
    with EmbeddingStore(path) as s:
        s.put_many(s.namespace(fp, DIM, model="tiny"), shas, x, failures={sha(50): "bad"})
    return fp, shas, x


def _check_read_only(s: EmbeddingStore, fp: str, shas: list[str], x: np.ndarray, reason: str) -> None:
    assert not s.writable
    ns = s.namespace(fp, DIM)  # a model the store already knows: fine
    np.testing.assert_array_equal(s.get_many(ns, shas), x)
    assert s.count(ns) == len(shas) and s.contains(ns, shas).all()
    assert s.failures(ns, [sha(50)]) == {sha(50): "bad"}
    assert list(s.iter_embeddings(ns, shas, chunk=5))[1][0] == 5
    with pytest.raises(StoreReadOnlyError) as info:
        s.put_many(ns, [sha(99)], embeddings(1))
    msg = str(info.value)
    assert str(s.path) in msg and reason in msg and "--store" in msg and "\n" not in msg
    with pytest.raises(StoreReadOnlyError):
        s.put_many(ns, [], None, failures={sha(98): "bad"})
    with pytest.raises(StoreReadOnlyError):
        s.namespace(fingerprint("new model"), DIM)
    with pytest.raises(StoreReadOnlyError, match=r"; 12 images need encoding — pass --store"):
        s.require_writable(12)
    with pytest.raises(StoreReadOnlyError, match=r"; 1 image needs encoding"):
        s.require_writable(1)
    assert isinstance(info.value, ArtifactError)
    assert s.count(ns) == len(shas)


def test_explicitly_read_only_store(tmp_path):
    path = tmp_path / "store"
    fp, shas, x = _filled_store(path)
    with EmbeddingStore(path, readonly=True) as s:
        _check_read_only(s, fp, shas, x, "opened read-only")
    with EmbeddingStore(path) as s:  # and writable again
        assert s.writable
        s.put_many(s.namespace(fp, DIM), [sha(99)], embeddings(1))


def _refuse_writable_open(monkeypatch, code: int) -> list[dict]:
    """lmdb.open fails as on a read-only filesystem unless asked for readonly=True."""
    real_open = lmdb.open
    calls: list[dict] = []

    def fake_open(path, **kw):
        calls.append(kw)
        if not kw.get("readonly"):
            raise lmdb.Error(f"{path}: {os.strerror(code)}")
        return real_open(path, **kw)
    monkeypatch.setattr(store_mod.lmdb, "open", fake_open)
    return calls


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_location_opens_read_only(tmp_path, monkeypatch, code):
    path = tmp_path / "store"
    fp, shas, x = _filled_store(path)
    calls = _refuse_writable_open(monkeypatch, code)
    with EmbeddingStore(path) as s:
        _check_read_only(s, fp, shas, x, os.strerror(code))
    assert [c.get("readonly", False) for c in calls] == [False, True]
    assert calls[1]["lock"] is False  # a read-only location cannot hold the reader table


def test_unwritable_location_without_a_store_is_refused(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    _refuse_writable_open(monkeypatch, errno.EROFS)
    with pytest.raises(ArtifactError, match="empty") as info:
        EmbeddingStore(empty)
    assert not isinstance(info.value, StoreReadOnlyError) and os.strerror(errno.EROFS) in str(info.value)
    assert list(empty.iterdir()) == []
    with pytest.raises(ArtifactError, match="nowhere"):
        EmbeddingStore(tmp_path / "nowhere", readonly=True)
    with pytest.raises(ArtifactError, match="empty"):
        EmbeddingStore(empty, readonly=True)


def test_uncreatable_location_is_refused(tmp_path, monkeypatch):
    def refuse(self, *a, **kw):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(self))
    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ArtifactError, match="new-store"):
        EmbeddingStore(tmp_path / "new-store")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through chmod")
def test_chmod_read_only_directory_opens_read_only(tmp_path):
    path = tmp_path / "store"
    fp, shas, x = _filled_store(path)
    modes = {p: p.stat().st_mode for p in [path, *path.iterdir()]}
    try:
        for p in path.iterdir():
            p.chmod(0o444)
        path.chmod(0o555)
        with EmbeddingStore(path) as s:
            _check_read_only(s, fp, shas, x, os.strerror(errno.EACCES))
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


# --- fork safety ------------------------------------------------------------------------------------------


def _forked_child(s: EmbeddingStore, fp: str, wrote: multiprocessing.synchronize.Event,
                  parent_wrote: multiprocessing.synchronize.Event, out) -> None:
    """Runs in a forked child with the parent's EmbeddingStore object."""
    parent_pid = os.getppid()
    ns = s.namespace(fp, DIM)
    np.testing.assert_array_equal(s.get_many(ns, [sha(i) for i in range(10)]), embeddings(10, seed=1))
    s.put_many(ns, [sha(i) for i in range(100, 120)], embeddings(20, seed=2), failures={sha(500): "child"})
    wrote.set()
    assert parent_wrote.wait(60)
    np.testing.assert_array_equal(s.get_many(ns, [sha(i) for i in range(200, 230)]), embeddings(30, seed=3))
    out.put((s._pid, parent_pid, os.getpid(), s.count(ns)))
    s.close()  # closes the child's own environment only


def test_forked_child_uses_the_parents_store_object(store):
    fp = fingerprint("a")
    ns = store.namespace(fp, DIM)
    store.put_many(ns, [sha(i) for i in range(10)], embeddings(10, seed=1))
    parent_env = store.env
    ctx = multiprocessing.get_context("fork")
    wrote, parent_wrote, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_forked_child, args=(store, fp, wrote, parent_wrote, out))
    proc.start()
    try:
        assert wrote.wait(60), "the child did not write"
        # The parent keeps using the same object while the child has its own environment open.
        np.testing.assert_array_equal(store.get_many(ns, [sha(i) for i in range(100, 120)]), embeddings(20, seed=2))
        assert store.failures(ns, [sha(500)]) == {sha(500): "child"}
        store.put_many(ns, [sha(i) for i in range(200, 230)], embeddings(30, seed=3))
        parent_wrote.set()
        child_pid_seen, parent_pid, child_pid, child_count = out.get(timeout=60)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    assert child_pid_seen == child_pid != parent_pid == os.getpid()  # the child opened its own environment
    assert child_count == 60
    assert store._pid == os.getpid()
    assert store.count(ns) == 60  # the parent's store still works after the child closed its copy
    store.put_many(ns, [sha(300)], embeddings(1, seed=4))
    assert store.count(ns) == 61
    assert store.env is not parent_env  # closed before the fork, reopened lazily in the parent
    with store.env.begin() as txn:
        assert txn.get(ns.key(sha(300))) is not None


class _StoreDataset:
    """A Dataset holding an EmbeddingStore, as a DataLoader worker would use it."""

    def __init__(self, s: EmbeddingStore, ns, shas: list[str]):
        self.store, self.ns, self.shas = s, ns, shas

    def __len__(self) -> int:
        return len(self.shas)

    def __getitem__(self, i: int):
        return self.store.get_many(self.ns, [self.shas[i]])[0], os.getpid()


def test_dataloader_workers_read_the_store(store):
    torch = pytest.importorskip("torch")
    ns = store.namespace(fingerprint("a"), DIM)
    shas = [sha(i) for i in range(40)]
    x = embeddings(40)
    store.put_many(ns, shas, x)
    dataset = _StoreDataset(store, ns, shas)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, shuffle=False,
                                         multiprocessing_context="fork")
    for epoch in range(2):  # each epoch forks new workers
        rows, pids = [], set()
        for emb, pid in loader:
            rows.append(emb.numpy())
            pids.update(int(p) for p in pid)
            store.put_many(ns, [sha(1000 + epoch)], embeddings(1, seed=epoch))  # the parent writes meanwhile
        np.testing.assert_array_equal(np.concatenate(rows), x)
        assert len(pids) == 2 and os.getpid() not in pids
    assert store.count(ns) == 42


def _spawned_reader(s: EmbeddingStore, fp: str) -> None:
    ns = s.namespace(fp, DIM)
    np.testing.assert_array_equal(s.get_many(ns, [sha(i) for i in range(5)]), embeddings(5))
    s.put_many(ns, [sha(77)], embeddings(1, seed=7))
    s.close()


def test_store_object_pickled_to_a_spawned_process(store):
    fp = fingerprint("a")
    ns = store.namespace(fp, DIM)
    store.put_many(ns, [sha(i) for i in range(5)], embeddings(5))
    proc = multiprocessing.get_context("spawn").Process(target=_spawned_reader, args=(store, fp))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 0
    np.testing.assert_array_equal(store.get_many(ns, [sha(77)]), embeddings(1, seed=7))


# --- two processes growing the map at once ----------------------------------------------------------------


def _grow_writer(path: str, fp: str, start: int, batches: int, small: int, go, out) -> None:
    resized = []
    real_remap = EmbeddingStore._remap

    def counting_remap(self, size):
        resized.append(size)
        return real_remap(self, size)
    EmbeddingStore._remap = counting_remap
    with EmbeddingStore(Path(path), map_size=small) as s:
        ns = s.namespace(fp, 64)
        assert go.wait(60)
        for b in range(batches):
            ids = range(start + b * 100, start + (b + 1) * 100)
            s.put_many(ns, [sha(i) for i in ids], embeddings(100, 64, seed=start + b))
    out.put((start, sum(1 for r in resized if r == 0), sum(1 for r in resized if r > 0)))


def test_two_processes_grow_the_map_at_once(tmp_path):
    small = 1 << 17  # 128 KiB; the two writers add ~1.6 MiB: several doublings, taken in turns
    path = tmp_path / "store"
    fp = fingerprint("a")
    with EmbeddingStore(path, map_size=small) as s:
        s.namespace(fp, 64)
    ctx = multiprocessing.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_grow_writer, args=(str(path), fp, start, 30, small, go, out))
             for start in (0, 100_000)]
    for p in procs:
        p.start()
    go.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    adopted = sum(r[1] for r in results)
    grown = sum(r[2] for r in results)
    assert grown >= 3, results  # the map doubled several times
    assert adopted >= 1, results  # and a writer adopted the size the other one set (MapResizedError)
    with EmbeddingStore(path, map_size=small) as s:
        ns = s.namespace(fp, 64)
        assert s.count(ns) == 6000
        assert s.env.info()["map_size"] >= 8 * small
        for start in (0, 100_000):
            for b in range(30):
                ids = range(start + b * 100, start + (b + 1) * 100)
                np.testing.assert_array_equal(s.get_many(ns, [sha(i) for i in ids]), embeddings(100, 64, seed=start + b))


def _open_at_once(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        with EmbeddingStore(Path(path)) as s:
            s.namespace("ab" * 32, DIM)
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        results.put(f"{type(e).__name__}: {e}")


def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path):
    # store.json goes in before the LMDB files: no process may find LMDB files without it ("not empty and
    # holds no store.json"), which two queries starting on a fresh default store used to hit.
    ctx = multiprocessing.get_context("fork")
    for attempt in range(12):
        path, barrier, results = tmp_path / f"store-{attempt}", ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(str(path), barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert outcomes == ["ok"] * 6, outcomes
        assert json.loads((path / STORE_MANIFEST).read_text())["artifact"] == STORE_ARTIFACT


# --- what query stores: one read per photo, only the bytes' own failures, the decode version -----------------


def _cli(*args):
    from idia_engine.cli.app import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def query_world(tmp_path_factory, world, tiny_model_files):
    """An index of the world's names (tiny model, through the CLI) and a query function over a faces folder."""
    root = tmp_path_factory.mktemp("store-query")
    config, ckpt = tiny_model_files
    r = _cli("build-index", world["names_file"], "--index-dir", root / "idx", "--model", config, "--pretrained",
             ckpt, "-q")
    assert r.exit_code == 0, r.output

    def query(faces: Path, store: Path, out: Path) -> tuple[dict, dict, str]:
        """(summary.json, run.json, stderr) of one query."""
        r = _cli("query", faces, "--index-dir", root / "idx", "--store", store, "--out", out, "-q")
        assert r.exit_code == 0, r.output
        return (json.loads((out / "summary.json").read_text(encoding="utf-8")),
                json.loads((out / "run.json").read_text(encoding="utf-8")), r.stderr)
    return query


def _faces(tmp_path: Path, world: dict, people: int = 2) -> Path:
    import shutil

    faces = tmp_path / "faces"
    for name in world["people"][:people]:
        shutil.copytree(world["faces"] / name.replace(" ", "_"), faces / name.replace(" ", "_"))
    return faces


def _store_namespace(s: EmbeddingStore, model, decode_version: int | None = None):
    from idia_engine.engine.query.images import DECODE_VERSION
    from idia_engine.engine.query.run import image_fingerprint

    return s.namespace(image_fingerprint(model, decode_version or DECODE_VERSION), model.info.embed_dim)


def _new_photo(path: Path, seed: int) -> bytes:
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path,
                                                                                                    format="PNG")
    return path.read_bytes()


def test_a_photo_replaced_or_unreadable_between_hash_and_decode_is_not_stored(tmp_path, world, query_world,
                                                                                tiny_model, monkeypatch):
    import idia_engine.engine.query.images as images_mod

    faces = _faces(tmp_path, world)
    folder = faces / world["people"][0].replace(" ", "_")
    replaced, vanishing = folder / "replaced.png", folder / "vanishing.png"
    old_sha = hashlib.sha256(_new_photo(replaced, 1)).hexdigest()
    vanishing_sha = hashlib.sha256(_new_photo(vanishing, 2)).hexdigest()
    real_read, calls = images_mod.read_photo, []

    def racing_read(path):
        calls.append(Path(path))
        if Path(path) == replaced:  # another photo takes its name between the hash and the decode
            _new_photo(replaced, 3)
        if Path(path) == vanishing:  # a transient failure: the file is back (unchanged) for the next run
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_read(path)
    monkeypatch.setattr(images_mod, "read_photo", racing_read)
    summary, run, stderr = query_world(faces, tmp_path / "store", tmp_path / "report")
    assert sorted(calls) == sorted(p for p in faces.rglob("*.png"))  # each photo read once to be decoded
    skipped = {s["path"]: s["reason"] for s in summary["skipped_files"]}
    assert "changed while the run read it" in skipped[str(replaced)]
    assert skipped[str(vanishing)].startswith("cannot read: Permission denied (after it was hashed; tried again")
    assert summary["counts"]["images_used"] == 8 and run["images_encoded"] == 8
    assert "2 photo(s) could not be read now and are skipped for this run" in stderr
    with EmbeddingStore(tmp_path / "store") as s:
        ns = _store_namespace(s, tiny_model)
        # Neither photo's hash got an embedding nor a "does not decode" marker: nothing to trust for ever.
        assert not s.contains(ns, [old_sha, vanishing_sha]).any()
        assert s.failures(ns, [old_sha, vanishing_sha]) == {}

    monkeypatch.setattr(images_mod, "read_photo", real_read)
    summary, run, _ = query_world(faces, tmp_path / "store", tmp_path / "report")
    assert summary["skipped_files"] == [] and summary["counts"]["images_used"] == 10
    assert (run["images_encoded"], run["images_from_cache"]) == (2, 8)  # both tried again, the rest cached
    new_sha = hashlib.sha256(replaced.read_bytes()).hexdigest()
    with EmbeddingStore(tmp_path / "store") as s:
        ns = _store_namespace(s, tiny_model)
        assert s.contains(ns, [new_sha, vanishing_sha]).all() and not s.contains(ns, [old_sha]).any()
        pixels = images_mod.ImageDataset([(replaced, new_sha)], tiny_model.preprocess, keys_are_sha256=True)[0]
        np.testing.assert_allclose(s.get_many(ns, [new_sha])[0],
                                   tiny_model.encode_images(pixels.pixels[None])[0], atol=1e-5)


def test_embeddings_from_before_exif_orientation_are_not_reused(tmp_path, world, query_world, tiny_model):
    faces = _faces(tmp_path, world, people=1)
    photos = sorted(faces.rglob("*.png"))
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in photos]
    with EmbeddingStore(tmp_path / "store") as s:  # a store as an earlier version left it: decode version 1
        legacy = _store_namespace(s, tiny_model, decode_version=1)
        s.put_many(legacy, shas, embeddings(len(shas), dim=tiny_model.info.embed_dim))
    summary, run, stderr = query_world(faces, tmp_path / "store", tmp_path / "report")
    assert (run["images_encoded"], run["images_from_cache"]) == (len(shas), 0)
    assert re.search(rf"warning: store .* holds embeddings of {len(shas)} of these photo\(s\) made before "
                     r"idia-engine applied their EXIF orientation; they are not reused", stderr)
    _, run, stderr = query_world(faces, tmp_path / "store", tmp_path / "report")
    assert (run["images_encoded"], run["images_from_cache"]) == (0, len(shas)) and "EXIF" not in stderr
