"""Ground-truth membership labels: a CSV with columns `name,member` and optionally `occurrences`.

`member` is one of 1/0, true/false, yes/no (any case). Names are NFC-normalised like person names.
Labels should come from exact caption search in the training data, never from kNN similarity (which
gave wrong labels in the paper's first version).

`occurrences` (optional column) is how often the person appears in the training data (a whole number
>= 0; an empty cell means unknown). The evaluation uses it to show TPR per occurrence bin, since the
paper finds the attack works for people seen only ~75 times in 2.8 M pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..candidates.names_file import check_name, normalize_name
from ..disk.textfiles import iter_csv_rows
from ..errors import InputError

_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}
_WHOLE_NUMBER = re.compile(r"[0-9]+")
OCCURRENCES_COLUMN = "occurrences"


@dataclass(frozen=True)
class LabelTable:
    """The rows of a labels file."""

    members: dict[str, bool]  # name -> is member
    occurrences: dict[str, int]  # name -> training-data occurrences, only for rows that give a value
    has_occurrences_column: bool  # whether the file has an `occurrences` column at all


def read_label_table(path: Path) -> LabelTable:
    """Read membership and (if the column exists) occurrence counts.

    Raises InputError naming the file and line of any bad row: an unknown member value, an occurrence
    count that is not a whole number >= 0, or a name given twice with different values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"labels file {path} does not exist or is not a file")
    members: dict[str, bool] = {}
    occurrences: dict[str, int] = {}
    has_occurrences_column = False
    for lineno, row in iter_csv_rows(path, ("name", "member"), "labels file"):
        has_occurrences_column = OCCURRENCES_COLUMN in row
        name = normalize_name(row.get("name") or "")
        where = f"{path}:{lineno}"
        check_name(name, where=where)
        member = _parse_member(row.get("member"), name, where)
        if name in members and members[name] != member:
            raise InputError(f"{where}: {name!r} is labelled both member and non-member")
        members[name] = member
        count = _parse_occurrences(row.get(OCCURRENCES_COLUMN), name, where)
        if count is not None:
            if name in occurrences and occurrences[name] != count:
                raise InputError(f"{where}: {name!r} has two occurrence counts ({occurrences[name]} and {count})")
            occurrences[name] = count
    if not members:
        raise InputError(f"labels file {path} has a header but no rows")
    return LabelTable(members, occurrences, has_occurrences_column)


def read_labels(path: Path) -> dict[str, bool]:
    """name -> is member. Raises InputError naming the file and line of any bad row."""
    return read_label_table(path).members


def _parse_member(raw: str | None, name: str, where: str) -> bool:
    value = (raw or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InputError(f"{where}: member value {raw!r} for {name!r}; use 1/0, true/false or yes/no")


def _parse_occurrences(raw: str | None, name: str, where: str) -> int | None:
    """A whole number >= 0, or None for an empty cell (unknown) or a file without the column."""
    value = (raw or "").strip()
    if not value:
        return None
    if not _WHOLE_NUMBER.fullmatch(value):
        raise InputError(f"{where}: {OCCURRENCES_COLUMN} value {raw!r} for {name!r}; use a whole number >= 0 "
                         "(or leave the cell empty if unknown)")
    return int(value)
