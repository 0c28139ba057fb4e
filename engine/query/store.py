"""The image-embedding store: LMDB, keyed by model fingerprint + SHA-256 of the image bytes.

Key   b"e" + fingerprint (32 bytes) + sha256 of the image file (32 bytes)
Value the embedding as raw little-endian float32 (or float16) bytes, L2-normalised
Key   b"x" + fingerprint (32 bytes) + sha256 of the image file (32 bytes)
Value UTF-8 reason why the image did not decode (written in the same transaction as its batch)
Meta  b"m" + fingerprint -> JSON {"dim", "dtype", "model"}: recorded once per model, checked on every use

The fingerprint `query` passes is its image fingerprint (`run.image_fingerprint`): the model's weights, the
image forward-pass precision and the decode version (`images.DECODE_VERSION`: how file bytes become
pixels, EXIF orientation applied since version 2). Because it is part of every key, embeddings of
different models, precisions or decodings can share a store without ever mixing: those made before EXIF
orientation was applied stay under their own fingerprint and are never reused (a query says so when it
meets them). The SHA-256 is of the very bytes that were decoded (one read; `images.read_photo`), and only
failures those bytes determine get a b"x" marker: a read that failed is retried by the next run.
Each `put_many` is one LMDB transaction: an interrupted run keeps every batch it
committed, with the images of that batch that did not decode, and resumes after it (so a rerun forms the
same batches as an uninterrupted run). An image has an embedding or a failure marker, never both: an
embedding written for it removes its marker. The b"x" key kind was added within schema 1: schema-1 readers
only look up the b"e"/b"m" keys they know (exact keys and prefix ranges), so they ignore it, and the
schema was not bumped. The map grows automatically when it fills up, also while other processes have
the store open (they adopt the new size). A new store gets its store.json before any LMDB file (published
with link(2), so the first of several processes creating it at once wins and the others use it). Reads go
in bounded chunks (`iter_embeddings`), so 10^6 images
never need to fit in memory at once.

Processes and threads. An LMDB environment must not be used, nor closed, in a process forked from the
one that opened it (and py-lmdb refuses to open the same files twice in one process, which a forked child
counts as). So the environment is per process: `EmbeddingStore` records the pid that opened it, closes it
just before any `os.fork` of its process (a fork hook that waits for the transactions in flight) and
reopens it lazily on next use, in the parent and in the child alike; an environment found to belong to
another pid is dropped unused, never closed. DataLoader workers and multiprocessing children can therefore
use an inherited `EmbeddingStore` (or a pickled one: only the path and options travel). Environments are
opened with MDB_NOTLS (py-lmdb always does), so a reader slot is held by a read transaction in flight, not
by a thread: `_MAX_READERS` bounds concurrent read transactions over all processes. Slots left by killed
processes are reclaimed (`reader_check`) on open and when the table is full.

Read-only locations. When the store's directory or files cannot be written (EACCES, EROFS, EPERM) but a
store is there (store.json), it is opened read-only with `readonly=True, lock=False`: a read-only location
cannot hold the lock file's reader table, so nothing protects our snapshot from a writer that does have
write access to the same files; reads are only consistent if nobody writes there meanwhile (which is what a
read-only location normally means). `writable` is False then, and any write raises `StoreReadOnlyError`.

It stays one module (about 560 lines) on purpose: the LMDB environment's life cycle (open, remap while
other processes grow the map, close before a fork and reopen after it, reader slots) is one piece of
state that every read and write goes through; split across files, its invariants would be too.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb
import numpy as np

from ..disk.atomic import TMP_MARK
from ..disk.textfiles import INT, STR, DictOf, Fields, check_fields
from ..disk.versions import library_versions, utc_now
from ..errors import ArtifactError, ManifestMismatchError

log = logging.getLogger(__name__)

STORE_SCHEMA_VERSION = 1
STORE_ARTIFACT = "idia-engine embedding store"
STORE_MANIFEST = "store.json"
_INITIAL_MAP_SIZE = 1 << 30  # 1 GiB of address space; the file grows only as data is written
_MAX_READERS = 1024
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_READONLY_ERRNOS = (errno.EACCES, errno.EROFS, errno.EPERM)
_READERS_FULL_WAIT_S = 30.0  # how long a read waits for a reader slot before giving up
KEY_FORMAT = ("b'e' + model fingerprint (32 B) + sha256(image bytes) (32 B) -> raw embedding bytes; "
              "b'x' + model fingerprint (32 B) + sha256(image bytes) (32 B) -> UTF-8 reason the image did not "
              "decode; b'm' + model fingerprint -> JSON {dim, dtype, model}")


class StoreReadOnlyError(ArtifactError):
    """A write was asked of an embedding store opened read-only (a read-only location)."""

    def __init__(self, path: Path | str, reason: str | None = None, n_images: int | None = None):
        if reason is None:  # a caller's own one-line message
            self.path, self.reason, self.n_images = None, None, n_images
            super().__init__(str(path))
            return
        self.path, self.reason, self.n_images = Path(path), reason, n_images
        need = ""
        if n_images is not None:
            need = f"; {n_images} image{' needs' if n_images == 1 else 's need'} encoding"
        super().__init__(f"embedding store {path} is read-only ({reason}){need} — "
                         "pass --store with a writable directory")


# store.json's keys and their types, checked on every open (StoreManifest's fields).
STORE_MANIFEST_SCHEMA = Fields(required={"schema_version": INT, "artifact": STR, "created_at": STR,
                                         "key_format": STR, "library_versions": DictOf(STR)})


@dataclass(frozen=True)
class StoreManifest:
    """store.json beside the LMDB files."""

    schema_version: int
    artifact: str
    created_at: str
    key_format: str  # documents the key layout above
    library_versions: dict[str, str]


@dataclass(frozen=True)
class Namespace:
    """The embeddings of one model inside the store."""

    fingerprint: str  # hex SHA-256 of the model (ModelInfo.fingerprint)
    dim: int
    dtype: str  # "float32" or "float16"

    @property
    def prefix(self) -> bytes:
        return b"e" + bytes.fromhex(self.fingerprint)

    def key(self, sha256_hex: str) -> bytes:
        return self.prefix + bytes.fromhex(sha256_hex)

    def failure_key(self, sha256_hex: str) -> bytes:
        return b"x" + bytes.fromhex(self.fingerprint) + bytes.fromhex(sha256_hex)


def _copy(value) -> bytes | None:
    """Read transactions hand out buffers valid only inside them: copy what must outlive one."""
    return None if value is None else bytes(value)


def _keys_with(txn, prefix: bytes) -> Iterator[bytes]:
    """The keys of a read transaction that start with `prefix`, in key order (a cursor from the first)."""
    cur = txn.cursor()
    if cur.set_range(prefix):
        for key in cur.iternext(keys=True, values=False):
            key = bytes(key)
            if not key.startswith(prefix):
                return
            yield key


def _readonly_reason(e: BaseException) -> str | None:
    """The reason text when `e` says the location cannot be written, else None."""
    code = getattr(e, "code", None) if isinstance(e, lmdb.Error) else getattr(e, "errno", None)
    if code in _READONLY_ERRNOS:
        return os.strerror(code)
    if code is None and isinstance(e, lmdb.Error):  # no code recorded: LMDB's message ends with strerror
        for known in _READONLY_ERRNOS:
            if str(e).endswith(os.strerror(known)):
                return os.strerror(known)
    if isinstance(e, lmdb.ReadonlyError):  # py-lmdb's class for EACCES (0.9) and MDB_IS_READONLY (1.0)
        return "read-only"
    return None


# --- fork safety ----------------------------------------------------------------------------------------

_LIVE_STORES: weakref.WeakSet[EmbeddingStore] = weakref.WeakSet()
_FORK_LOCK = threading.Lock()
_HELD_FOR_FORK: list = []


def _before_fork() -> None:
    """Close every store's environment before this process forks (hold new transactions until after)."""
    _FORK_LOCK.acquire()
    for store in list(_LIVE_STORES):
        if store._hold_for_fork():
            _HELD_FOR_FORK.append(store)


def _after_fork_in_parent() -> None:
    for store in _HELD_FOR_FORK:
        store._release_after_fork(child=False)
    _HELD_FOR_FORK.clear()
    _FORK_LOCK.release()


def _after_fork_in_child() -> None:
    _HELD_FOR_FORK.clear()
    for store in list(_LIVE_STORES):  # every store: the child starts with fresh locks and counts
        store._release_after_fork(child=True)
    _FORK_LOCK.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


class EmbeddingStore:
    """An LMDB environment holding image embeddings of one or more models.

    `readonly=True` opens an existing store read-only (without LMDB locks); a store whose location
    cannot be written is opened so too. `map_size` is the initial map size asked for (default
    `_INITIAL_MAP_SIZE`); the map grows past it as needed.
    """

    def __init__(self, path: Path, readonly: bool = False, map_size: int | None = None):
        self.path = Path(path)
        self.map_size = int(map_size if map_size is not None else _INITIAL_MAP_SIZE)
        self.writable = not readonly
        self.readonly_reason: str | None = "opened read-only" if readonly else None
        self._init_process_state()
        if self.path.exists() and not self.path.is_dir():
            raise ArtifactError(f"embedding store {self.path} exists and is not a directory")
        if not readonly:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ArtifactError(f"cannot create embedding store {self.path} "
                                    f"({e.strerror or e}); pass --store with a writable directory") from None
        elif not self.path.is_dir():
            raise ArtifactError(f"embedding store {self.path} does not exist (opened read-only)")
        manifest = self.path / STORE_MANIFEST
        created = False  # store.json written by this call (taken back if LMDB then cannot open here)
        if not manifest.exists():
            # store.json first, the LMDB files after it: a process that lists LMDB files here finds
            # store.json too when it looks again (two queries creating one store at once both succeed).
            foreign = [q for q in self.path.iterdir() if TMP_MARK not in q.name and q.name != STORE_MANIFEST]
            if manifest.exists():
                pass  # another process has just created the store
            elif foreign:
                raise ArtifactError(f"{self.path} is not empty and holds no {STORE_MANIFEST}; pass another --store")
            elif readonly:
                raise ArtifactError(f"{self.path} holds no embedding store ({STORE_MANIFEST}) to open read-only")
            else:
                created = self._create_manifest(manifest)
        has_manifest = not created  # a store was there before this call
        try:
            obj = json.loads(manifest.read_text(encoding="utf-8"))
        except OSError as e:
            raise ArtifactError(f"{manifest} cannot be read ({e.strerror or e}); pass another --store") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ArtifactError(f"{manifest} is not valid JSON ({str(e).splitlines()[0] if str(e) else e!r})"
                                ) from None
        if not isinstance(obj, dict) or obj.get("artifact") != STORE_ARTIFACT or obj.get("schema_version") != STORE_SCHEMA_VERSION:
            raise ArtifactError(
                f"{self.path} is not an idia-engine embedding store of schema {STORE_SCHEMA_VERSION}; "
                "pass another --store"
            )
        check_fields(obj, STORE_MANIFEST_SCHEMA, manifest, "pass another --store")
        try:
            self._open_env()
        except (lmdb.Error, OSError) as e:
            reason = None if readonly else _readonly_reason(e)
            if reason is None:
                raise ArtifactError(f"cannot open embedding store {self.path}: {e}") from e
            if not has_manifest:
                if created:
                    manifest.unlink(missing_ok=True)
                raise ArtifactError(f"embedding store location {self.path} is not writable ({reason}) and holds "
                                    "no store yet; pass --store with a writable directory") from None
            log.info("embedding store %s cannot be written (%s): opening it read-only", self.path, reason)
            self.writable, self.readonly_reason = False, reason
            try:
                self._open_env()
            except (lmdb.Error, OSError) as e2:
                raise ArtifactError(f"cannot open embedding store {self.path} read-only: {e2}") from e2
        _LIVE_STORES.add(self)

    def _create_manifest(self, manifest: Path) -> bool:
        """Write store.json unless another process just did (link(2) publishes it only if it is absent);
        True if this call wrote it."""
        data = json.dumps(asdict(StoreManifest(
            schema_version=STORE_SCHEMA_VERSION, artifact=STORE_ARTIFACT, created_at=utc_now(),
            key_format=KEY_FORMAT, library_versions=library_versions(),
        )), indent=2) + "\n"
        tmp = manifest.with_name(f".{manifest.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, manifest)
                return True
            except FileExistsError:
                return False  # another process created the store first: use it
        except OSError as e:
            reason = _readonly_reason(e)
            if reason is not None:
                raise ArtifactError(f"embedding store location {self.path} is not writable ({reason}) and holds "
                                    "no store yet; pass --store with a writable directory") from None
            raise ArtifactError(f"cannot write {manifest} ({e.strerror or e}); "
                                "pass --store with a writable directory") from None
        finally:
            tmp.unlink(missing_ok=True)

    # --- the environment of this process -------------------------------------------------------

    def _init_process_state(self) -> None:
        self._env: lmdb.Environment | None = None
        self._pid: int | None = None  # the process that opened self._env
        self._cond = threading.Condition()
        self._active = 0  # transactions in flight in this process
        self._exclusive = False  # a remap, close or fork holds the environment
        self._local = threading.local()  # per thread: inside a transaction?
        self._closed = False

    def _open_env(self) -> lmdb.Environment:
        """Open this process's environment (caller holds the exclusive gate or is the constructor)."""
        if self.writable:
            env = lmdb.open(str(self.path), map_size=self.map_size, max_readers=_MAX_READERS, subdir=True,
                            readahead=False, create=False)
            env.reader_check()  # reclaim reader slots of killed processes
        else:
            env = lmdb.open(str(self.path), map_size=self.map_size, max_readers=_MAX_READERS, subdir=True,
                            readahead=False, readonly=True, lock=False, create=False)
        self._env, self._pid = env, os.getpid()
        return env

    def _current_env(self) -> lmdb.Environment:
        """This process's environment, opened on first use here (never one inherited through a fork)."""
        if self._closed:
            raise ArtifactError(f"embedding store {self.path} is closed")
        env = self._env
        if env is not None and self._pid == os.getpid():
            return env
        if env is not None:  # inherited without the fork hook: never use it, never close it
            self._env = None
        try:
            return self._open_env()
        except lmdb.Error as e:
            raise ArtifactError(f"cannot open embedding store {self.path} in process {os.getpid()}: {e}") from e

    @property
    def env(self) -> lmdb.Environment:
        """This process's LMDB environment (opened lazily).

        A transaction begun on it directly is not tracked: the fork hook closes the environment under it
        (use the methods, or finish it before anything forks).
        """
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            return self._current_env()

    @contextmanager
    def _shared(self) -> Iterator[lmdb.Environment]:
        """Hold the environment for one transaction (many at once, across threads)."""
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            env = self._current_env()
            self._active += 1
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield env
        finally:
            self._local.depth -= 1
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def _exclusive_env(self) -> Iterator[None]:
        """Hold the environment alone (no transaction in flight in this process): remap, close."""
        with self._cond:
            while self._exclusive or self._active:
                self._cond.wait()
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    def _hold_for_fork(self) -> bool:
        """Fork hook: wait for this process's transactions, close the environment, hold off new ones."""
        if getattr(self._local, "depth", 0):  # the forking thread is inside a transaction: leave it be
            return False
        with self._cond:
            while self._exclusive or self._active:
                self._cond.wait()
            self._exclusive = True
        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._env = None
        return True

    def _release_after_fork(self, child: bool) -> None:
        if child:  # one thread lives on in the child; the parent's locks and counts mean nothing here
            self._cond = threading.Condition()
            self._active, self._exclusive = 0, False
            self._local = threading.local()
            return
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    def close(self) -> None:
        """Close this process's environment (an environment inherited through a fork is only dropped)."""
        if self._closed:
            return
        with self._exclusive_env():
            if self._env is not None and self._pid == os.getpid():
                self._env.close()
            self._env = None
            self._closed = True
        _LIVE_STORES.discard(self)

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """Pickles (spawned workers) carry the path and options; the environment is opened where used."""
        return {"path": self.path, "map_size": self.map_size, "writable": self.writable,
                "readonly_reason": self.readonly_reason, "closed": self._closed}

    def __setstate__(self, state: dict) -> None:
        self.path, self.map_size = state["path"], state["map_size"]
        self.writable, self.readonly_reason = state["writable"], state["readonly_reason"]
        self._init_process_state()
        self._closed = state["closed"]
        if not self._closed:
            _LIVE_STORES.add(self)

    # --- namespaces ---------------------------------------------------------------------------

    def namespace(self, fingerprint: str, dim: int, dtype: str = "float32", model: str = "") -> Namespace:
        """Register (or check) the namespace of a model; raise if the store recorded another dim/dtype."""
        if dtype not in _DTYPES:
            raise ArtifactError(f"store dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
            raise ArtifactError(f"model fingerprint {fingerprint!r} is not 64 lowercase hex digits (a SHA-256)")
        ns = Namespace(fingerprint, int(dim), dtype)
        meta_key = b"m" + bytes.fromhex(fingerprint)
        raw = self._transact(lambda txn: _copy(txn.get(meta_key)))
        if raw is not None:
            meta = json.loads(raw)
            if meta["dim"] != ns.dim or meta["dtype"] != ns.dtype:
                raise ManifestMismatchError(
                    f"store {self.path} holds embeddings of model {fingerprint[:12]} as {meta['dtype']}[{meta['dim']}], "
                    f"asked for {dtype}[{dim}]; use the recorded dtype or another --store"
                )
            return ns
        self._write([(meta_key, json.dumps({"dim": ns.dim, "dtype": ns.dtype, "model": model}).encode())])
        return ns

    def recorded_namespace(self, fingerprint: str) -> Namespace | None:
        """The namespace of a model as the store recorded it (its dim and dtype), or None when the store holds
        nothing of that model; unlike `namespace`, never writes."""
        raw = self._transact(lambda txn: _copy(txn.get(b"m" + bytes.fromhex(fingerprint))))
        if raw is None:
            return None
        meta = json.loads(raw)
        return Namespace(fingerprint, int(meta["dim"]), meta["dtype"])

    # --- writes -------------------------------------------------------------------------------

    def require_writable(self, n_images: int | None = None) -> None:
        """Raise StoreReadOnlyError (naming n_images, the images that need encoding) if read-only."""
        if not self.writable:
            raise StoreReadOnlyError(self.path, self.readonly_reason or "read-only", n_images)

    def _remap(self, size: int) -> None:
        """set_mapsize(size) on this process's environment once no transaction is in flight here."""
        with self._exclusive_env():
            self._current_env().set_mapsize(size)

    def _transact(self, body: Callable, *, write: bool = False):
        """Run body(txn) in one transaction and return its result.

        Another process may have grown the map (MapResizedError): adopt its size and retry. A write
        that fills the map (MapFullError) doubles the map and retries; nothing of it was committed.
        A full reader table is first cleared of dead processes' slots, then waited on.
        """
        if write:
            self.require_writable()
        deadline = None
        while True:
            try:
                with self._shared() as env, env.begin(write=write, buffers=not write) as txn:
                    return body(txn)
            except lmdb.MapResizedError:
                self._remap(0)
            except lmdb.MapFullError:
                with self._shared() as env:
                    new_size = env.info()["map_size"] * 2
                log.info("embedding store %s is full: growing the map to %d MiB", self.path, new_size >> 20)
                self._remap(new_size)
            except lmdb.ReadersFullError:
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + _READERS_FULL_WAIT_S
                if now > deadline:
                    raise ArtifactError(f"embedding store {self.path}: all {_MAX_READERS} reader slots are in use "
                                        "by other processes; retry when fewer run") from None
                with self._shared() as env:
                    if self.writable:
                        env.reader_check()
                time.sleep(0.05)
            except lmdb.ReadonlyError as e:
                self.writable, self.readonly_reason = False, _readonly_reason(e) or "read-only"
                raise StoreReadOnlyError(self.path, self.readonly_reason) from None

    def _write(self, items: Sequence[tuple[bytes, bytes]], deletes: Sequence[bytes] = ()) -> None:
        """Write all items (and delete `deletes`) in one committed transaction."""
        def put_all(txn) -> None:
            for k in deletes:
                txn.delete(k)
            for k, v in items:
                txn.put(k, v)
        self._transact(put_all, write=True)

    def put_many(self, ns: Namespace, sha256s: Sequence[str], embeddings: np.ndarray | None,
                 failures: Mapping[str, str] | None = None) -> None:
        """Store embeddings [n, dim] under the given image hashes, in one committed transaction.

        `failures` ({sha256: reason}) records, in the same transaction, the images of this batch that
        did not decode (b"x" keys), so that a rerun neither retries them nor forms other batches.
        With no embeddings (`sha256s` empty, `embeddings` None or empty) only the failures are written.
        """
        failures = dict(failures or {})
        if embeddings is None:
            if len(sha256s):
                raise ArtifactError(f"no embeddings given for {len(sha256s)} image(s)")
            emb = np.zeros((0, ns.dim), _DTYPES[ns.dtype])
        else:
            emb = np.asarray(embeddings)
            if len(sha256s) == 0 and emb.size == 0:
                emb = emb.reshape(0, ns.dim)
        if emb.shape != (len(sha256s), ns.dim):
            raise ArtifactError(f"expected embeddings of shape ({len(sha256s)}, {ns.dim}), got {emb.shape}")
        both = set(failures).intersection(sha256s)
        if both:
            raise ArtifactError(f"image {min(both)[:16]}... is given both an embedding and a decode failure")
        for s, reason in failures.items():
            if not isinstance(reason, str):
                raise ArtifactError(f"decode failure of image {s[:16]}...: reason must be a string, got {reason!r}")
        if not len(sha256s) and not failures:
            return
        emb = np.ascontiguousarray(emb, dtype=_DTYPES[ns.dtype])
        items = [(ns.key(s), emb[i].tobytes()) for i, s in enumerate(sha256s)]
        items += [(ns.failure_key(s), reason.encode("utf-8", "replace")) for s, reason in failures.items()]
        self._write(items, deletes=[ns.failure_key(s) for s in sha256s])

    # --- reads --------------------------------------------------------------------------------

    def contains(self, ns: Namespace, sha256s: Sequence[str]) -> np.ndarray:
        """Boolean [n]: which images have an embedding of this model."""
        return self._transact(lambda txn: np.array([txn.get(ns.key(s)) is not None for s in sha256s], dtype=bool))

    def failures(self, ns: Namespace, sha256s: Sequence[str]) -> dict[str, str]:
        """{sha256: reason} of the given images recorded as not decodable for this model."""
        def read_all(txn) -> dict[str, str]:
            out = {}
            for s in sha256s:
                raw = txn.get(ns.failure_key(s))
                if raw is not None:
                    out[s] = bytes(raw).decode("utf-8", "replace")
            return out
        return self._transact(read_all)

    def get_many(self, ns: Namespace, sha256s: Sequence[str]) -> np.ndarray:
        """float32 [n, dim] embeddings of the given images; raise if one is missing or malformed."""
        dtype = _DTYPES[ns.dtype]
        out = np.empty((len(sha256s), ns.dim), np.float32)

        def read_all(txn) -> np.ndarray:
            for i, s in enumerate(sha256s):
                raw = txn.get(ns.key(s))
                if raw is None:
                    raise ArtifactError(f"store {self.path} has no embedding of image {s[:16]}... for model "
                                        f"{ns.fingerprint[:12]}")
                if len(raw) != ns.dim * dtype.itemsize:
                    raise ArtifactError(f"store {self.path}: entry of image {s[:16]}... has {len(raw)} bytes, "
                                        f"expected {ns.dim * dtype.itemsize}; the store is corrupt")
                out[i] = np.frombuffer(raw, dtype=dtype)
            return out
        return self._transact(read_all)

    def iter_embeddings(self, ns: Namespace, sha256s: Sequence[str], chunk: int = 4096
                        ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start row, float32 [<=chunk, dim]) over `sha256s` in order, a bounded chunk at a time."""
        for start in range(0, len(sha256s), chunk):
            yield start, self.get_many(ns, sha256s[start:start + chunk])

    def shas(self, ns: Namespace) -> list[str]:
        """The image hashes (hex) with an embedding of this model, in key order (failure markers not listed)."""
        return self._transact(lambda txn: [key[len(ns.prefix):].hex() for key in _keys_with(txn, ns.prefix)])

    def count(self, ns: Namespace) -> int:
        """Number of embeddings stored for this model (failure markers not counted)."""
        return self._transact(lambda txn: sum(1 for _ in _keys_with(txn, ns.prefix)))
