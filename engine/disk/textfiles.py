"""Reading the small text inputs (templates, labels, image manifests) with errors that name file and line."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from ..errors import ArtifactError, InputError


def decode_utf8(data: bytes, path: Path, what: str) -> str:
    """Decode a whole file's bytes (a leading BOM dropped); the error names the file, line and byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: {what} is not valid UTF-8 (byte 0x{data[e.start]:02x}); save it as UTF-8"
                         ) from None


def read_input_bytes(path: Path, what: str) -> bytes:
    """The bytes of a user's input file; an unreadable one is an InputError naming it, not a traceback."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read ({e.strerror or e}); give a readable file") from None


def iter_csv_rows(path: Path, required: tuple[str, ...], what: str,
                  one_of: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number in the file, row) of a UTF-8 CSV whose header holds the `required` columns and,
    when `one_of` is given, at least one of those alternatives (which of them the caller reads is its
    choice: every row holds a key for every header column).

    Header names are stripped of surrounding spaces. The line number is the file's real line (the csv
    module skips blank lines, so counting rows would drift).
    """
    reader = csv.DictReader(io.StringIO(decode_utf8(read_input_bytes(path, what), path, what), newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    found = ",".join(header) or "none"
    missing = [c for c in required if c not in header]
    if missing:
        expected = ",".join(required) + (f",<one of {'/'.join(one_of)}>" if one_of else "")
        raise InputError(f"{what} {path} has no column {missing[0]!r}; expected header {expected} (found {found})")
    if one_of and not any(c in header for c in one_of):
        quoted = [repr(c) for c in one_of]
        alternatives = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        raise InputError(f"{what} {path} has no column {alternatives}; expected header {','.join(required)} "
                         f"plus one of {', '.join(one_of)} (found {found})")
    reader.fieldnames = header
    for row in reader:
        yield reader.line_num, row


def read_artifact_json(path: Path, artifact: str, schema_version: int, hint: str) -> dict:
    """The JSON manifest of one of our artifacts (index, report, ...), checked for kind and schema version.

    Every failure is an ArtifactError naming the file and ending with `hint` (what to do about it)."""
    import json

    if not path.is_file():
        raise ArtifactError(f"{path} is missing; {hint}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); {hint}") from None
    found = obj.get("artifact") if isinstance(obj, dict) else None
    if found != artifact:
        raise ArtifactError(f"{path} is not an {artifact} manifest (artifact {found!r}); {hint}")
    if obj.get("schema_version") != schema_version:
        raise ArtifactError(f"{path} has schema version {obj.get('schema_version')!r}; this idia-engine reads "
                            f"version {schema_version}; {hint}")
    return obj
