"""Training captions as they are stored: Parquet shards (LAION, CC3M as img2dataset writes them), plain
text (one caption per line) and TSV (CC3M's own release: caption, tab, URL, no header).

Every reader yields batches of captions (str, or None for a null) together with how many of them held
bytes that are not UTF-8 (decoded with U+FFFD in their place, counted, never fatal: one bad byte in a
billion rows must not stop the job). The unit a job splits into is a `Piece`: a whole text/TSV file, or
a run of row groups of one Parquet file, so a single large shard still spreads over workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError

CAPTION_COLUMNS = ("caption", "TEXT", "text")  # tried in order: CC3M (img2dataset), LAION, generic
KIND_OF_SUFFIX = {".parquet": "parquet", ".txt": "text", ".tsv": "tsv"}
ROWS_PER_PIECE = 1_000_000  # Parquet row groups are grouped into pieces of at least this many rows


@dataclass(frozen=True)
class CaptionFile:
    """One input file and how its captions are read."""

    path: Path
    kind: str  # "parquet", "text" or "tsv"
    column: str | None  # the caption column (Parquet: a name; TSV: a header name, or None = column 0, no header)


@dataclass(frozen=True)
class Piece:
    """A unit of work: a whole file, or row groups [first, stop) of a Parquet file."""

    file: CaptionFile
    row_groups: tuple[int, int] | None  # None = the whole file


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """The caption files of the inputs: files as given, folders searched (recursively) for *.parquet,
    *.txt and *.tsv, sorted; InputError for a missing input, an unknown suffix or nothing found."""
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in KIND_OF_SUFFIX)
            if not found:
                raise InputError(f"caption folder {path} holds no .parquet, .txt or .tsv file")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in KIND_OF_SUFFIX:
                raise InputError(f"caption file {path}: unknown kind {path.suffix or '(no suffix)'!r}; give "
                                 ".parquet, .txt (one caption per line) or .tsv files, or folders of them")
            files.append(path)
        else:
            raise InputError(f"caption input {path} does not exist")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if len(unique) < len(files):
        raise InputError("a caption file is given twice (directly or through a folder); give each once, or its "
                         "captions would be counted twice")
    return files


def resolve_file(path: Path, column: str | None) -> CaptionFile:
    """How to read `path`: its kind and caption column (checked against the file's schema or header)."""
    kind = KIND_OF_SUFFIX[path.suffix.lower()]
    if kind == "parquet":
        schema = _parquet(path).schema_arrow
        names = schema.names
        chosen = column or next((c for c in CAPTION_COLUMNS if c in names), None)
        if chosen is None or chosen not in names:
            wanted = repr(column) if column else f"any of {', '.join(CAPTION_COLUMNS)}"
            raise InputError(f"caption file {path} has no column {wanted} (it has {', '.join(names[:12]) or 'none'}); "
                             "name the caption column with --column")
        field = schema.field(chosen)
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
                or pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)):
            raise InputError(f"caption file {path}: column {chosen!r} holds {field.type}, not text")
        return CaptionFile(path, kind, chosen)
    if kind == "tsv":
        header = _first_line(path).split("\t")
        if column is not None:
            if column not in header:
                raise InputError(f"caption file {path}: header has no column {column!r} (it has "
                                 f"{', '.join(header[:12])}); a TSV without a header is read from its first column")
            return CaptionFile(path, kind, column)
        chosen = next((c for c in CAPTION_COLUMNS if c in header), None)
        return CaptionFile(path, kind, chosen)  # None: no header, the caption is column 0 (CC3M's layout)
    return CaptionFile(path, kind, None)


def pieces_of(file: CaptionFile) -> list[Piece]:
    """A Parquet file in runs of row groups of >= ROWS_PER_PIECE rows; any other file whole."""
    if file.kind != "parquet":
        return [Piece(file, None)]
    meta = _parquet(file.path).metadata
    pieces, start, rows = [], 0, 0
    for g in range(meta.num_row_groups):
        rows += meta.row_group(g).num_rows
        if rows >= ROWS_PER_PIECE:
            pieces.append(Piece(file, (start, g + 1)))
            start, rows = g + 1, 0
    if start < meta.num_row_groups or not pieces:
        pieces.append(Piece(file, (start, meta.num_row_groups)))
    return pieces


def _parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"caption file {path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        return f.readline().decode("utf-8", errors="replace").rstrip("\r\n").lstrip("\ufeff")


def _decode(raw: bytes) -> tuple[str, bool]:
    """(text, whether it held invalid UTF-8)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def iter_batches(piece: Piece, batch_rows: int = 65536) -> Iterator[tuple[list[str | None], int]]:
    """(captions, how many of them held invalid UTF-8) per batch of a piece."""
    file = piece.file
    if file.kind == "parquet":
        reader = _parquet(file.path)
        groups = list(range(*piece.row_groups)) if piece.row_groups else None
        try:
            for batch in reader.iter_batches(batch_size=batch_rows, row_groups=groups, columns=[file.column]):
                column = batch.column(0)
                if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
                    decoded = [None if v is None else _decode(v) for v in column.to_pylist()]
                    yield [None if d is None else d[0] for d in decoded], sum(1 for d in decoded if d and d[1])
                else:
                    yield column.to_pylist(), 0
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"caption file {file.path} is damaged ({str(e).splitlines()[0]})") from None
        return
    column_index = 0
    skip_header = False
    if file.kind == "tsv" and file.column is not None:
        column_index = _first_line(file.path).split("\t").index(file.column)
        skip_header = True
    captions: list[str | None] = []
    invalid = 0
    with open(file.path, "rb") as f:
        for lineno, raw in enumerate(f):
            if skip_header and lineno == 0:
                continue
            line = raw.rstrip(b"\r\n")
            if lineno == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if file.kind == "tsv":
                fields = line.split(b"\t")
                line = fields[column_index] if column_index < len(fields) else b""
            text, bad = _decode(line)
            invalid += bad
            captions.append(text)
            if len(captions) >= batch_rows:
                yield captions, invalid
                captions, invalid = [], 0
    if captions:
        yield captions, invalid
