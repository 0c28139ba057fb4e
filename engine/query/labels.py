"""Ground-truth membership labels: a CSV with a `name` column, one membership column and optionally
`occurrences`.

Three formats are read, told apart by their header; exactly one column of a file gives the memberships:

1. `member` (the engine's own format): 1/0, true/false, yes/no.
2. `membership` (the paper authors' membership CSV): member / non_member (non-member too).
3. `decision` (the `persons.csv` that `query` writes, so that one report's decisions can serve as labels
   for another run): member / non-member. A persons.csv written with labels also has a `label` column
   (member / non-member, empty for people the labels did not name); when any of its cells is non-empty,
   `label` is read instead of `decision`: the ground truth the report was run with beats the attack's
   guess, and the file then gives back exactly the labels it was written with (rows with an empty `label`
   are unlabelled). Reading `decision`, rows with `n_images` 0 are unlabelled too: a person without a
   usable photo was never decided (persons.csv says non-member for want of a score).

When a file has several of these columns, the first in that order wins (`member` over `membership` over
`label`/`decision`); `label` is only read beside `decision`, since on its own its meaning is unknown.
Values are matched in any case, surrounding spaces ignored. Names are NFC-normalised like person names.
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

MEMBER_COLUMN = "member"
MEMBERSHIP_COLUMN = "membership"
LABEL_COLUMN = "label"
DECISION_COLUMN = "decision"
# The columns a labels file must have one of, in order of precedence (`label` rides along with `decision`).
SOURCE_COLUMNS = (MEMBER_COLUMN, MEMBERSHIP_COLUMN, DECISION_COLUMN)
OCCURRENCES_COLUMN = "occurrences"
N_IMAGES_COLUMN = "n_images"

_WHOLE_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class _Vocabulary:
    """The values one membership column accepts."""

    true: frozenset[str]  # lower-case values meaning member
    false: frozenset[str]  # lower-case values meaning non-member
    valid: str  # the valid values as an error message lists them


_MEMBER_VALUES = _Vocabulary(frozenset({"1", "true", "yes"}), frozenset({"0", "false", "no"}),
                             "1/0, true/false or yes/no")
# membership (the authors' file) and persons.csv's label and decision share one vocabulary.
_MEMBERSHIP_VALUES = _Vocabulary(frozenset({"member"}), frozenset({"non_member", "non-member"}),
                                 "member or non_member (also non-member; any case)")
_VOCABULARY = {MEMBER_COLUMN: _MEMBER_VALUES, MEMBERSHIP_COLUMN: _MEMBERSHIP_VALUES,
               LABEL_COLUMN: _MEMBERSHIP_VALUES, DECISION_COLUMN: _MEMBERSHIP_VALUES}


@dataclass(frozen=True)
class LabelTable:
    """The rows of a labels file."""

    members: dict[str, bool]  # name -> is member
    occurrences: dict[str, int]  # name -> training-data occurrences, only for rows that give a value
    has_occurrences_column: bool  # whether the file has an `occurrences` column at all
    source_column: str  # the column the memberships were read from: member, membership, label or decision


def read_label_table(path: Path) -> LabelTable:
    """Read membership and (if the column exists) occurrence counts; see the module docstring for the formats.

    Raises InputError naming the file (and line) of a file without a membership column, an unknown
    membership value, an occurrence count that is not a whole number >= 0, or a name given twice with
    different values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"labels file {path} does not exist or is not a file")
    rows = list(iter_csv_rows(path, ("name",), "labels file", one_of=SOURCE_COLUMNS))
    if not rows:
        raise InputError(f"labels file {path} has a header but no rows")
    column = _source_column(rows)
    members: dict[str, bool] = {}
    occurrences: dict[str, int] = {}
    for lineno, row in rows:
        if _unlabelled(row, column):
            continue
        name = normalize_name(row.get("name") or "")
        where = f"{path}:{lineno}"
        check_name(name, where=where)
        member = _parse_member(row.get(column), column, name, where)
        if name in members and members[name] != member:
            raise InputError(f"{where}: {name!r} is labelled both member and non-member")
        members[name] = member
        count = _parse_occurrences(row.get(OCCURRENCES_COLUMN), name, where)
        if count is not None:
            if name in occurrences and occurrences[name] != count:
                raise InputError(f"{where}: {name!r} has two occurrence counts ({occurrences[name]} and {count})")
            occurrences[name] = count
    if not members:
        why = ("every label cell is empty" if column == LABEL_COLUMN
               else f"every row has {N_IMAGES_COLUMN} 0 (people without photos were never decided)")
        raise InputError(f"labels file {path} labels nobody: {why}; give a file with member/non-member values")
    return LabelTable(members, occurrences, OCCURRENCES_COLUMN in rows[0][1], column)


def read_labels(path: Path) -> dict[str, bool]:
    """name -> is member. Raises InputError naming the file and line of any bad row."""
    return read_label_table(path).members


def _source_column(rows: list[tuple[int, dict[str, str]]]) -> str:
    """The one column the memberships are read from (every row holds a key for every header column)."""
    header = rows[0][1]
    for column in (MEMBER_COLUMN, MEMBERSHIP_COLUMN):
        if column in header:
            return column
    if LABEL_COLUMN in header and any((row.get(LABEL_COLUMN) or "").strip() for _, row in rows):
        return LABEL_COLUMN
    return DECISION_COLUMN


def _unlabelled(row: dict[str, str], column: str) -> bool:
    """Rows of a persons.csv that carry no label: an empty `label`, or a `decision` made without photos."""
    if column == LABEL_COLUMN:
        return not (row.get(LABEL_COLUMN) or "").strip()
    if column == DECISION_COLUMN:
        return (row.get(N_IMAGES_COLUMN) or "").strip() == "0"
    return False


def _parse_member(raw: str | None, column: str, name: str, where: str) -> bool:
    vocabulary = _VOCABULARY[column]
    value = (raw or "").strip().lower()
    if value in vocabulary.true:
        return True
    if value in vocabulary.false:
        return False
    raise InputError(f"{where}: {column} value {raw!r} for {name!r}; use {vocabulary.valid}")


def _parse_occurrences(raw: str | None, name: str, where: str) -> int | None:
    """A whole number >= 0, or None for an empty cell (unknown) or a file without the column."""
    value = (raw or "").strip()
    if not value:
        return None
    if not _WHOLE_NUMBER.fullmatch(value):
        raise InputError(f"{where}: {OCCURRENCES_COLUMN} value {raw!r} for {name!r}; use a whole number >= 0 "
                         "(or leave the cell empty if unknown)")
    return int(value)
