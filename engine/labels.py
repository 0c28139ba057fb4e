"""Ground-truth membership labels: a CSV with columns `name,member`.

`member` is one of 1/0, true/false, yes/no (any case). Names are NFC-normalised like person names.
Labels should come from exact caption search in the training data, never from kNN similarity (which
gave wrong labels in the paper's first version).
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .names import check_name, normalize_name
from .textfiles import iter_csv_rows

_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def read_labels(path: Path) -> dict[str, bool]:
    """name -> is member. Raises InputError naming the file and line of any bad row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"labels file {path} does not exist or is not a file")
    labels: dict[str, bool] = {}
    for lineno, row in iter_csv_rows(path, ("name", "member"), "labels file"):
        name = normalize_name(row.get("name") or "")
        check_name(name, where=f"{path}:{lineno}")
        value = (row.get("member") or "").strip().lower()
        if value in _TRUE:
            member = True
        elif value in _FALSE:
            member = False
        else:
            raise InputError(
                f"{path}:{lineno}: member value {row.get('member')!r} for {name!r}; use 1/0, true/false or yes/no"
            )
        if name in labels and labels[name] != member:
            raise InputError(f"{path}:{lineno}: {name!r} is labelled both member and non-member")
        labels[name] = member
    if not labels:
        raise InputError(f"labels file {path} has a header but no rows")
    return labels
