"""clip-retrieval's embedding layout, written and read: the field's convention for CLIP embeddings at scale.

    <folder>/
      img_emb/img_emb_0.npy            # float16 or float32 [N_0, D], rows L2-normalised (text_emb/text_emb_K.npy
      img_emb/img_emb_1.npy            # for text embeddings)
      ...
      metadata/metadata_0.parquet      # N_0 rows, row-aligned with shard 0 (image_path, caption, url, ...)
      metadata/metadata_1.parquet
      ...

Shard K of the embeddings goes with metadata shard K; embedding-reader (`file_format="parquet_npy"`) pairs
them by sorting both file lists, and autofaiss and clip-retrieval's back end read the same. So a shard's
number is its position: shards are numbered 0, 1, 2, ... without gaps, and none is empty (embedding-reader
drops an empty .npy from its list, after which every later pair would be misaligned).

Writing (`ShardWriter`): rows arrive in chunks and are cut into shards of a fixed row count; each .npy is
a memory-mapped file whose blocks are reserved up front (a full disk is one line, not a SIGBUS), each
metadata shard one Parquet file written without timestamps, so the same rows give the same bytes.

Reading (`read_shards`): every file is checked before any row is used: the pairs (a missing metadata
shard, a stray file), each .npy header and size against its bytes (a truncated or corrupt file), the
dtype, one dimension for all shards, and each shard's row count against its metadata's. Whatever is
wrong is one line naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..disk.space import allocate_npy
from ..errors import InputError

IMAGE_EMBEDDINGS = "img_emb"  # folder and file prefix of image embeddings
TEXT_EMBEDDINGS = "text_emb"  # folder and file prefix of text embeddings
METADATA = "metadata"  # folder and file prefix of the row-aligned metadata
DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}  # what clip-retrieval writes, and we read
FINGERPRINT_COLUMN = "model_fingerprint"  # per row: the fingerprint of the model that computed it (an export's)

# `idia-engine export` writes two such folders and a sidecar naming the model behind them.
EXPORT_SIDECAR = "idia_export.json"
EXPORT_ARTIFACT = "idia-engine export"
EXPORT_NAMES = "names"  # names/text_emb/ + names/metadata/: the index's prompt embeddings
EXPORT_IMAGES = "images"  # images/img_emb/ + images/metadata/: the store's photo embeddings
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def shard_file(kind: str, k: int) -> str:
    """Shard k's file inside its folder: img_emb_3.npy, text_emb_0.npy, metadata_3.parquet."""
    return f"{kind}_{k}.parquet" if kind == METADATA else f"{kind}_{k}.npy"


@dataclass(frozen=True)
class Shard:
    """One embeddings file and its metadata, checked."""

    number: int  # K of img_emb_K.npy / metadata_K.parquet
    embeddings: Path
    metadata: Path
    rows: int
    dim: int
    dtype: str  # "float16" or "float32"
    start: int  # rows of the shards before it


def read_shards(folder: Path, kind: str = IMAGE_EMBEDDINGS, *, what: str = "--embeddings") -> list[Shard]:
    """The shards of `folder` (`<folder>/<kind>/` beside `<folder>/metadata/`), checked as the module says, in
    shard order; raise InputError (one line) for anything that does not fit the layout."""
    folder = Path(folder)
    emb_dir, meta_dir = folder / kind, folder / METADATA
    layout = f"clip-retrieval's layout: {kind}/{kind}_K.npy beside {METADATA}/{METADATA}_K.parquet"
    if not folder.is_dir():
        raise InputError(f"{what} {folder} is not a folder; give one in {layout}")
    for sub in (emb_dir, meta_dir):
        if not sub.is_dir():
            raise InputError(f"{what} {folder} has no {sub.name}/ folder; expected {layout}")
    npys = _numbered(emb_dir, kind, ".npy", what)
    metas = _numbered(meta_dir, METADATA, ".parquet", what)
    if not npys:
        raise InputError(f"{what} {emb_dir} holds no {kind}_K.npy file; expected {layout}")
    for k in npys:
        if k not in metas:
            raise InputError(f"{what}: {npys[k]} has no metadata shard {meta_dir / shard_file(METADATA, k)}; "
                             "every embeddings shard needs its row-aligned metadata")
    for k in metas:
        if k not in npys:
            raise InputError(f"{what}: {metas[k]} has no embeddings shard {emb_dir / shard_file(kind, k)}; "
                             "remove it or add its embeddings")
    expected = list(range(len(npys)))
    if sorted(npys) != expected:
        gap = next(k for k in expected if k not in npys)
        raise InputError(f"{what}: {emb_dir} has no {shard_file(kind, gap)} but has later shards; shards are "
                         "numbered 0, 1, 2, ... without gaps (readers pair them by position)")
    shards: list[Shard] = []
    start = 0
    for k in expected:
        rows, dim, dtype = _npy_header(npys[k], what)
        n_meta = _parquet_rows(metas[k], what)
        if rows != n_meta:
            raise InputError(f"{what}: {npys[k]} holds {rows} rows but {metas[k]} {n_meta}; a shard's embeddings "
                             "and metadata must be row-aligned")
        if rows == 0:
            raise InputError(f"{what}: {npys[k]} holds no rows; readers skip an empty shard and misalign the "
                             "ones after it: remove it and renumber")
        if shards and dim != shards[0].dim:
            raise InputError(f"{what}: {npys[k]} has dimension {dim}, {shards[0].embeddings} {shards[0].dim}; "
                             "every shard holds embeddings of one model")
        shards.append(Shard(k, npys[k], metas[k], rows, dim, dtype, start))
        start += rows
    return shards


def _numbered(folder: Path, prefix: str, suffix: str, what: str) -> dict[int, Path]:
    """{K: path} of the files <prefix>_K<suffix> in folder; any other file of that suffix is refused (a reader
    globbing *<suffix> would read it as a shard)."""
    pattern = re.compile(rf"{re.escape(prefix)}_(0|[1-9][0-9]*){re.escape(suffix)}")
    found: dict[int, Path] = {}
    for path in sorted(folder.rglob(f"*{suffix}")):
        match = pattern.fullmatch(path.name)
        if match is None or path.parent != folder:
            raise InputError(f"{what}: {path} is not named {prefix}_K{suffix} directly in {folder}; readers of "
                             f"the layout take every *{suffix} there for a shard: move it out")
        found[int(match.group(1))] = path
    return found


def _npy_header(path: Path, what: str) -> tuple[int, int, str]:
    """(rows, dim, dtype name) of a 2-D little-endian float16/float32 C-order .npy whose size fits its header."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version[0]}.{version[1]}; expected 1.0 or 2.0")
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{what}: {path} is not a readable .npy file ({str(e).splitlines()[0] if str(e) else e!r})"
                         ) from None
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise InputError(f"{what}: {path} holds {dtype} values; expected float16 or float32 (little-endian)")
    if len(shape) != 2 or fortran:
        raise InputError(f"{what}: {path} holds an array of shape {shape}{' in Fortran order' if fortran else ''}; "
                         "expected rows x dimension (C order)")
    rows, dim = (int(n) for n in shape)
    expected = offset + rows * dim * dtype.itemsize
    if size != expected:
        raise InputError(f"{what}: {path} has {size} bytes, its header says {rows} x {dim} {names[dtype]} "
                         f"({expected} bytes); the file is truncated or corrupt")
    return rows, dim, names[dtype]


def _parquet_rows(path: Path, what: str) -> int:
    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{what}: {path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None


def read_columns(shard: Shard, columns: Sequence[str], what: str = "--embeddings") -> pa.Table:
    """The given metadata columns of a shard; a missing column is one line naming the columns there are."""
    try:
        schema = pq.read_schema(shard.metadata)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise InputError(f"{what}: {shard.metadata} has no column {missing[0]!r} (its columns: "
                             f"{', '.join(schema.names)})")
        return pq.read_table(shard.metadata, columns=list(columns))
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{what}: {shard.metadata} is not a readable Parquet file ({str(e).splitlines()[0]})"
                         ) from None


def column_names(shard: Shard, what: str = "--embeddings") -> list[str]:
    try:
        return list(pq.read_schema(shard.metadata).names)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{what}: {shard.metadata} is not a readable Parquet file ({str(e).splitlines()[0]})"
                         ) from None


def open_rows(shard: Shard) -> np.ndarray:
    """The shard's embeddings [rows, dim], memory-mapped in their stored dtype (checked by `read_shards`)."""
    return np.load(shard.embeddings, mmap_mode="r")


class ShardWriter:
    """Rows of a known total, written as shards of `rows_per_file` (the last one shorter) under `folder`:
    `<folder>/<kind>/<kind>_K.npy` in `dtype` and `<folder>/metadata/metadata_K.parquet` with `schema`."""

    def __init__(self, folder: Path, kind: str, total: int, dim: int, rows_per_file: int, dtype: str,
                 schema: pa.Schema):
        self.folder, self.kind, self.total, self.dim = Path(folder), kind, int(total), int(dim)
        self.rows_per_file, self.dtype, self.schema = int(rows_per_file), DTYPES[dtype], schema
        (self.folder / kind).mkdir(parents=True)
        (self.folder / METADATA).mkdir()
        self.files: list[str] = []  # written so far, relative to `folder`
        self._written = 0  # rows
        self._shard: np.memmap | None = None
        self._filled = 0  # rows of the open shard
        self._meta: list[pa.Table] = []

    def add(self, embeddings: np.ndarray, metadata: pa.Table) -> None:
        """Append rows [n, dim] (any float dtype; stored as `dtype`) with their n metadata rows."""
        if len(embeddings) != metadata.num_rows or embeddings.shape[1:] != (self.dim,):
            raise ValueError(f"{len(embeddings)} x {embeddings.shape[1:]} rows for {metadata.num_rows} metadata rows")
        done = 0
        while done < len(embeddings):
            if self._shard is None:
                self._open_shard()
            take = min(len(embeddings) - done, len(self._shard) - self._filled)
            self._shard[self._filled:self._filled + take] = embeddings[done:done + take]
            self._meta.append(metadata.slice(done, take))
            self._filled += take
            done += take
            if self._filled == len(self._shard):
                self._close_shard()

    def close(self) -> None:
        """Check that every row announced came; the last shard was closed when its last row came."""
        if self._written != self.total or self._shard is not None:
            raise ValueError(f"{self.kind}: {self._written} of {self.total} rows written")

    def _open_shard(self) -> None:
        k = len(self.files) // 2
        rows = min(self.rows_per_file, self.total - self._written)
        self._shard = allocate_npy(self.folder / self.kind / shard_file(self.kind, k), self.dtype, (rows, self.dim))
        self._filled = 0

    def _close_shard(self) -> None:
        k = len(self.files) // 2
        self._shard.flush()
        self._shard = None
        table = pa.concat_tables(self._meta).cast(self.schema)
        pq.write_table(table, self.folder / METADATA / shard_file(METADATA, k))
        self._meta = []
        self._written += self._filled
        self.files += [f"{self.kind}/{shard_file(self.kind, k)}", f"{METADATA}/{shard_file(METADATA, k)}"]
