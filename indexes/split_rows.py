"""float32 rows stored as their bfloat16 rounding plus the 16 bits that rounding dropped: exact, in 4 bytes.

Kinds that scan in bf16 (`bf16`, `ensemble-bf16`) need every template's rows twice: rounded to bf16 for the
scan, and in float32 for the exact re-scoring. A float32 number's bit pattern, read as an integer, is its
bf16 rounding's pattern shifted up 16 bits plus a remainder: with the rounding to nearest, ties away from
zero (`round_to_bf16`), that remainder lies in [-2^15, 2^15) and fits an int16 exactly. So the float32 rows
are the bf16 rows the scan reads anyway plus one int16 file of remainders ("low halves"):

    bits(x) = (bits(x^) << 16) + low          x^ = round_to_bf16(x), low = int16

6 bytes per element (float32 file + bf16 copy) become 4: at 10^6 names x 21 templates x 512, 43 GB on disk
instead of 64.5 GB. The join is integer arithmetic, exact for every finite float32 (signed zeros and
subnormals included); the split checks every remainder fits (which proves the join, `split_float32`).

`SplitRows` is the joined rows as the exact paths read them (`rows[ids]`, `rows[a:b]`, `read_rows`): each
access reads the rows it needs from both files with pread, never through a memory map, so a search that
holds every template's rows keeps none of them resident.
"""

from __future__ import annotations

import copy
import os
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch
from idia_engine.engine.disk.atomic import TMP_MARK

from .errors import VectorFormatError
from .vectors import pread_rows

_HALF = 1 << 15
SPLIT_CHUNK = 1 << 16  # rows split at once (2 x 64 MiB of float32 temporaries at D = 512)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 [...] -> bf16 [...]: each value rounded to the nearest bf16, ties away from zero (on the bit
    pattern: (bits + 2^15) >> 16, which for a sign-magnitude float rounds the magnitude). This rounding, not
    torch's ties-to-even, leaves a remainder that fits an int16 (`split_float32`). Finite inputs only."""
    bits = x.contiguous().view(torch.int32)
    # int32 arithmetic: the shift is arithmetic, and the cast keeps the low 16 bits, which is the pattern
    return ((bits + _HALF) >> 16).to(torch.int16).view(torch.bfloat16)


def split_float32(x: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The low halves int16 [N, D] of float32 rows x given their `round_to_bf16` roundings `high` (the bf16
    patterns as int16 [N, D]); VectorFormatError where the pair does not join back to x exactly (`high` is
    not that rounding of x)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.int32)
    low = high.astype(np.int32)
    low <<= 16
    np.subtract(bits, low, out=low)  # modulo 2^32, like the join: (high << 16) + low == bits whatever it wraps
    # so where low fits 16 bits, its int16 copy joins back to x exactly; elsewhere high is not x's rounding
    if low.size and (low.min() < -_HALF or low.max() >= _HALF):
        raise VectorFormatError("the bf16 rows are not the nearest-ties-away rounding of the float32 rows: "
                                f"a remainder of {int(np.abs(low.astype(np.int64)).max())} does not fit 16 bits")
    return low.astype(np.int16)


def join_float32(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """float32 [...] from bf16 patterns `high` and low halves `low` (both int16 [...]): exact."""
    bits = high.astype(np.int32)  # in place after this copy: half the passes of (high << 16) + low
    bits <<= 16
    bits += low  # wraps like the uint32 pattern it is
    return bits.view(np.float32)


def npz_member(path: Path, member: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """(byte offset, shape, dtype) of the array `member` (e.g. "rows") of an uncompressed .npz file (what
    np.savez writes): where its data starts in the file, for reads that do not load the whole archive."""
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(f"{member}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise VectorFormatError(f"{path}: array {member} is compressed; rebuild the index")
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)  # the member's local file header: its name and extra field lengths at 26..29
            if local[:4] != b"PK\x03\x04":
                raise VectorFormatError(f"{path}: array {member} has no local zip header")
            f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                   + int.from_bytes(local[28:30], "little"))
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise VectorFormatError(f"{path} is not a readable .npz archive with array {member} ({e})") from None
    if fortran:
        raise VectorFormatError(f"{path}: array {member} is in Fortran order; rebuild the index")
    return offset, tuple(shape), np.dtype(dtype)


def low_file(t: int) -> str:
    """File name of template t's low halves (int16 [N, D] .npy) beside its bf16 rows."""
    return f"vectors_{t:02d}.low.npy"


def write_low_halves(vectors: np.ndarray, high_file: Path, out: Path) -> None:
    """Write `out`, the low halves of float32 `vectors` [N, D] against the bf16 rows stored as array "rows" of
    `high_file` (a bf16 index file), checked to join back exactly (`split_float32`). Atomic: a temporary name
    (which an interrupted build removes) until it is whole and synced."""
    offset, shape, dtype = npz_member(high_file, "rows")
    if shape != vectors.shape or dtype != np.int16:
        raise VectorFormatError(f"{high_file} holds rows {dtype} {shape}, expected int16 {vectors.shape}")
    high = np.memmap(high_file, np.int16, "r", offset=offset, shape=shape)
    tmp = out.with_name(f".{out.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        low = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=shape)
        for r0 in range(0, len(vectors), SPLIT_CHUNK):
            rows = slice(r0, r0 + SPLIT_CHUNK)
            low[rows] = split_float32(np.asarray(vectors[rows]), np.asarray(high[rows]))
        low.flush()
        del low, high
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


class SplitRows:
    """Template rows float32 [N, D] joined on demand from a bf16 index file's "rows" array and a low-halves
    .npy file. Reads as an array does where the exact paths read rows: `len`, `shape`, `dtype`, `ndim`,
    `rows[i]`, `rows[a:b]`, `rows[id_array]` (a new float32 array each time), and `read_rows`."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, high_file: Path, low_path: Path):
        self.high_file, self.low_file = Path(high_file), Path(low_path)
        self._high_rows: np.ndarray | None = None  # the bf16 patterns held in memory (`with_high_rows`)
        self._high_offset, shape, dtype = npz_member(self.high_file, "rows")
        if dtype != np.int16 or len(shape) != 2:
            raise VectorFormatError(f"{self.high_file} holds rows {dtype} {shape}, expected int16 [N, D]")
        try:
            low = np.load(self.low_file, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise VectorFormatError(f"{self.low_file} is not a readable .npy file ({e})") from None
        if low.shape != shape or low.dtype != np.int16:
            raise VectorFormatError(f"{self.low_file} holds {low.dtype} {low.shape}, expected int16 {shape} like "
                                    f"{self.high_file}")
        self._low_offset = low.offset
        del low
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"SplitRows({self.high_file.name} + {self.low_file.name}, shape={self.shape})"

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):  # rows[ids, :] and the like: rows first, then the rest in memory
            return self[key[0]][(slice(None),) + key[1:]]
        if isinstance(key, slice):
            return self.take_rows(np.arange(*key.indices(len(self)), dtype=np.int64))
        ids = np.asarray(key)
        if ids.dtype == bool:
            return self.take_rows(np.flatnonzero(ids))
        if ids.ndim == 0:
            return self.take_rows(ids.reshape(1))[0]
        return self.take_rows(ids.ravel()).reshape(ids.shape + (self.shape[1],))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def with_high_rows(self, high: np.ndarray) -> SplitRows:
        """These rows, their bf16 half taken from `high` (int16 [N, D]: the patterns of `high_file`'s rows,
        already in memory, e.g. a loaded bf16 index's), so each access reads only the low halves from disk."""
        if high.shape != self.shape or high.dtype != np.int16:
            raise VectorFormatError(f"bf16 rows in memory are {high.dtype} {high.shape}, {self!r} needs int16")
        other = copy.copy(self)
        other._high_rows = high
        return other

    def take_rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), D]: rows `ids` (any order, repeats, negative ids counting from the end)."""
        ids = np.asarray(ids, np.int64)
        n = len(self)
        if len(ids) and (ids.min() < -n or ids.max() >= n):
            bad = ids[(ids < -n) | (ids >= n)][0]
            raise IndexError(f"row {bad} is out of range for {self!r}")
        ids = np.where(ids < 0, ids + n, ids)
        if self._high_rows is not None:
            high = self._high_rows[ids]
        else:
            high = pread_rows(self.high_file, self._high_offset, np.int16, self.shape[1], ids)
        low = pread_rows(self.low_file, self._low_offset, np.int16, self.shape[1], ids)
        return join_float32(high, low)
