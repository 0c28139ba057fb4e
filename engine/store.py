"""The image-embedding store: LMDB, keyed by model fingerprint + SHA-256 of the image bytes.

Key   b"e" + fingerprint (32 bytes) + sha256 of the image file (32 bytes)
Value the embedding as raw little-endian float32 (or float16) bytes, L2-normalised
Meta  b"m" + fingerprint -> JSON {"dim", "dtype", "model"}: recorded once per model, checked on every use

Because the model fingerprint is part of every key, embeddings of different models can share a store
without ever mixing. Each `put_many` is one LMDB transaction: an interrupted run keeps every batch it
committed and resumes after it. The map grows automatically when it fills up. Reads go in bounded chunks
(`iter_embeddings`), so 10^6 images never need to fit in memory at once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import lmdb
import numpy as np

from .atomic import write_json_atomic
from .errors import ArtifactError, ManifestMismatchError
from .versions import library_versions, utc_now

log = logging.getLogger(__name__)

STORE_SCHEMA_VERSION = 1
STORE_ARTIFACT = "idia-engine embedding store"
STORE_MANIFEST = "store.json"
_INITIAL_MAP_SIZE = 1 << 30  # 1 GiB of address space; the file grows only as data is written
_MAX_READERS = 1024
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


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


def _copy(value) -> bytes | None:
    """Read transactions hand out buffers valid only inside them: copy what must outlive one."""
    return None if value is None else bytes(value)


class EmbeddingStore:
    """An LMDB environment holding image embeddings of one or more models."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ArtifactError(f"embedding store {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / STORE_MANIFEST
        if manifest.exists():
            try:
                obj = json.loads(manifest.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ArtifactError(f"{manifest} is not valid JSON ({e})") from None
            if not isinstance(obj, dict) or obj.get("artifact") != STORE_ARTIFACT or obj.get("schema_version") != STORE_SCHEMA_VERSION:
                raise ArtifactError(
                    f"{self.path} is not an idia-engine embedding store of schema {STORE_SCHEMA_VERSION}; "
                    "pass another --store"
                )
        elif any(self.path.iterdir()):
            raise ArtifactError(f"{self.path} is not empty and holds no {STORE_MANIFEST}; pass another --store")
        try:
            self.env = lmdb.open(str(self.path), map_size=_INITIAL_MAP_SIZE, max_readers=_MAX_READERS,
                                 subdir=True, readahead=False)
        except lmdb.Error as e:
            raise ArtifactError(f"cannot open embedding store {self.path}: {e}") from e
        if not manifest.exists():
            write_json_atomic(manifest, asdict(StoreManifest(
                schema_version=STORE_SCHEMA_VERSION, artifact=STORE_ARTIFACT, created_at=utc_now(),
                key_format="b'e' + model fingerprint (32 B) + sha256(image bytes) (32 B) -> raw embedding bytes; "
                           "b'm' + model fingerprint -> JSON {dim, dtype, model}",
                library_versions=library_versions(),
            )))

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

    # --- writes -------------------------------------------------------------------------------

    def _transact(self, body: Callable, *, write: bool = False):
        """Run body(txn) in one transaction and return its result.

        Another process may have grown the map (MapResizedError): adopt its size and retry. A write
        that fills the map (MapFullError) doubles the map and retries; nothing of it was committed.
        """
        while True:
            try:
                with self.env.begin(write=write, buffers=not write) as txn:
                    return body(txn)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.MapFullError:
                new_size = self.env.info()["map_size"] * 2
                log.info("embedding store %s is full: growing the map to %d MiB", self.path, new_size >> 20)
                self.env.set_mapsize(new_size)

    def _write(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Write all items in one committed transaction."""
        def put_all(txn) -> None:
            for k, v in items:
                txn.put(k, v)
        self._transact(put_all, write=True)

    def put_many(self, ns: Namespace, sha256s: Sequence[str], embeddings: np.ndarray) -> None:
        """Store embeddings [n, dim] under the given image hashes, in one committed transaction."""
        emb = np.asarray(embeddings)
        if emb.shape != (len(sha256s), ns.dim):
            raise ArtifactError(f"expected embeddings of shape ({len(sha256s)}, {ns.dim}), got {emb.shape}")
        emb = np.ascontiguousarray(emb, dtype=_DTYPES[ns.dtype])
        self._write([(ns.key(s), emb[i].tobytes()) for i, s in enumerate(sha256s)])

    # --- reads --------------------------------------------------------------------------------

    def contains(self, ns: Namespace, sha256s: Sequence[str]) -> np.ndarray:
        """Boolean [n]: which images have an embedding of this model."""
        return self._transact(lambda txn: np.array([txn.get(ns.key(s)) is not None for s in sha256s], dtype=bool))

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

    def count(self, ns: Namespace) -> int:
        """Number of embeddings stored for this model."""
        def count_keys(txn) -> int:
            n = 0
            cur = txn.cursor()
            if cur.set_range(ns.prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not bytes(key).startswith(ns.prefix):
                        break
                    n += 1
            return n
        return self._transact(count_keys)
