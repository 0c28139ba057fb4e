"""Reading the small text inputs (templates, labels, image manifests) with errors that name file and line."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as e:  # a field over csv's size limit (128 KiB): a bound on what one cell may cost
        raise InputError(f"{path}:{reader.line_num + 1}: {what} line cannot be read ({e}); "
                         "write one short value per cell") from None


# --- the typed keys of the JSON artifacts we read back --------------------------------------------------
# A file on disk is outside the code's control (edited by hand, written by another version, truncated):
# every key a reader uses is checked for its type here, so that a wrong one is one line naming the file
# and the key, never a TypeError deep inside the code that trusted it.


@dataclass(frozen=True)
class Is:
    """A JSON value of one kind."""

    what: str  # how an error names it ("a whole number")
    test: Callable[[Any], bool]  # True for a value of this kind

    def problem(self, value: Any, key: str) -> tuple[str, str, Any] | None:
        """(key path, what it must be, what it is) of the first mismatch, or None."""
        return None if self.test(value) else (key, self.what, value)


@dataclass(frozen=True)
class Nullable:
    """A value of `kind`, or null."""

    kind: Any  # Is, ListOf, DictOf or Fields

    @property
    def what(self) -> str:
        return f"{self.kind.what} or null"

    def problem(self, value: Any, key: str) -> tuple[str, str, Any] | None:
        found = None if value is None else self.kind.problem(value, key)
        return (key, self.what, value) if found is not None and found[0] == key else found


@dataclass(frozen=True)
class ListOf:
    """A list whose every item is of `item`."""

    item: Any  # the kind of each item

    @property
    def what(self) -> str:
        return f"a list whose items are each {self.item.what}"

    def problem(self, value: Any, key: str) -> tuple[str, str, Any] | None:
        if not isinstance(value, list):
            return key, self.what, value
        return next((p for i, v in enumerate(value) if (p := self.item.problem(v, f"{key}[{i}]"))), None)


@dataclass(frozen=True)
class DictOf:
    """An object with string keys whose every value is of `value`."""

    value: Any  # the kind of each value

    @property
    def what(self) -> str:
        return f"an object whose values are each {self.value.what}"

    def problem(self, value: Any, key: str) -> tuple[str, str, Any] | None:
        if not isinstance(value, dict):
            return key, self.what, value
        return next((p for k, v in value.items() if (p := self.value.problem(v, f"{key}.{k}"))), None)


@dataclass(frozen=True)
class Fields:
    """An object with these keys (others are allowed: newer writers may add some)."""

    required: Mapping[str, Any]  # key -> kind; the key must be present
    optional: Mapping[str, Any] = None  # key -> kind; checked when present

    what = "an object"

    def problem(self, value: Any, key: str) -> tuple[str, str, Any] | None:
        if not isinstance(value, dict):
            return key, self.what, value
        for name, kind in self.required.items():
            where = f"{key}.{name}" if key else name
            if name not in value:
                return where, f"present ({kind.what})", _MISSING
            if p := kind.problem(value[name], where):
                return p
        for name, kind in (self.optional or {}).items():
            if name in value and (p := kind.problem(value[name], f"{key}.{name}" if key else name)):
                return p
        return None


_MISSING = object()  # stands for a key that is not there at all

INT = Is("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool))
COUNT = Is("a whole number >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
NUMBER = Is("a finite number",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
STR = Is("a string", lambda v: isinstance(v, str))
BOOL = Is("true or false", lambda v: isinstance(v, bool))
OBJECT = Is("an object", lambda v: isinstance(v, dict))
LIST = Is("a list", lambda v: isinstance(v, list))
ANY = Is("any value", lambda v: True)


def check_fields(obj: Any, schema: Fields, path: Path, hint: str) -> None:
    """Raise ArtifactError naming the file and the first key of `obj` that `schema` does not allow."""
    found = schema.problem(obj, "")
    if found is None:
        return
    key, what, value = found
    if value is _MISSING:
        raise ArtifactError(f"{path} lacks the key {key!r}; {hint}")
    if not key:
        raise ArtifactError(f"{path} holds {_describe(value)}, not a JSON object; {hint}")
    raise ArtifactError(f"{path}: key {key!r} must be {what}, not {_describe(value)}; {hint}")


def _describe(value: Any) -> str:
    kinds = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    shown = repr(value)
    return f"{kinds.get(type(value), type(value).__name__)} ({shown if len(shown) <= 40 else shown[:37] + '...'})"


# The JSON artifacts whose readers go through `read_artifact_json`, by their "artifact" value: each is
# checked against its schema there (a module that owns an artifact registers it with `register_schema`).
ARTIFACT_SCHEMAS: dict[str, Fields] = {}


def register_schema(artifact: str, schema: Fields) -> None:
    ARTIFACT_SCHEMAS[artifact] = schema


# summary.json of a report (query/report.py's build_summary), as evaluate and compare read it. Its artifact
# name is spelt out: importing the query package here would be an import cycle.
# Its readers take a missing section as empty (`summary.get("index") or {}`), so the sections are optional
# (or null); what a section holds must be of its type.
REPORT_SUMMARY_SCHEMA = Fields(
    required={"schema_version": INT, "artifact": STR},
    optional={"parameters": Nullable(Fields(required={}, optional={
                  "tau": Nullable(INT), "labels_file": Nullable(STR), "source": Nullable(STR), "top_k": Nullable(INT),
                  "images_per_person": Nullable(INT), "seed": Nullable(INT), "index_dir": Nullable(STR),
                  "store_dir": Nullable(STR), "faces_roots": Nullable(ListOf(STR))})),
              "index": Nullable(Fields(required={}, optional={
                  "templates": Nullable(ListOf(STR)), "num_templates": Nullable(COUNT), "num_names": Nullable(COUNT),
                  "index_kind": Nullable(STR), "build_id": Nullable(STR)})),
              "model": Nullable(Fields(required={}, optional={
                  "model": Nullable(STR), "pretrained": Nullable(STR), "fingerprint": Nullable(STR)})),
              "persons_without_images": Nullable(ListOf(STR)), "counts": Nullable(DictOf(Nullable(NUMBER))),
              "search": Nullable(OBJECT), "library_versions": Nullable(DictOf(STR)), "created_at": Nullable(STR),
              "candidates_added_for_this_run": Nullable(ListOf(STR)), "skipped_files": Nullable(LIST),
              "metrics": Nullable(OBJECT), "labels": Nullable(OBJECT), "evaluation": Nullable(OBJECT)})
register_schema("idia-engine attack report", REPORT_SUMMARY_SCHEMA)


def read_artifact_json(path: Path, artifact: str, schema_version: int, hint: str,
                       schema: Fields | None = None) -> dict:
    """The JSON manifest of one of our artifacts (index, report, ...), checked for kind and schema version,
    then against `schema` (default: the one registered for `artifact`, if any).

    Every failure is an ArtifactError naming the file (and the key) and ending with `hint` (what to do)."""
    import json

    if not path.is_file():
        raise ArtifactError(f"{path} is missing; {hint}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read ({e.strerror or e}); {hint}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); {hint}") from None
    except RecursionError:  # nesting deeper than the parser's stack: not one of ours
        raise ArtifactError(f"{path} is not valid JSON (nested too deeply); {hint}") from None
    found = obj.get("artifact") if isinstance(obj, dict) else None
    if found != artifact:
        raise ArtifactError(f"{path} is not an {artifact} manifest (artifact {found!r}); {hint}")
    if obj.get("schema_version") != schema_version or isinstance(obj.get("schema_version"), bool):
        raise ArtifactError(f"{path} has schema version {obj.get('schema_version')!r}; this idia-engine reads "
                            f"version {schema_version}; {hint}")
    schema = schema if schema is not None else ARTIFACT_SCHEMAS.get(artifact)
    if schema is not None:
        check_fields(obj, schema, path, hint)
    return obj


# --- option values ------------------------------------------------------------------------------------
# The config dataclasses check every option with these when made, so that the Python API refuses what the
# command line refuses, with the same one-line message naming the option, the value and what is valid.


def check_whole_number(option: str, value: Any, low: int, high: int | None = None, why_high: str = "") -> None:
    """Raise InputError unless `value` is a whole number in low..high (`why_high`: the reason for the cap)."""
    import numbers

    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InputError(f"{option} must be a whole number >= {low}, got {value!r}")
    if value < low:
        raise InputError(f"{option} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InputError(f"{option} must be <= {high}{f' ({why_high})' if why_high else ''}, got {value}")


def check_finite_number(option: str, value: Any, low: float | None = None, high: float | None = None,
                        valid: str = "") -> None:
    """Raise InputError unless `value` is a finite number in [low, high] (`valid` says so in words)."""
    import numbers

    valid = valid or "a finite number" + (f" >= {low}" if low is not None else "") + \
        (f" <= {high}" if high is not None else "")
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        raise InputError(f"{option} must be {valid}, got {value!r}")
