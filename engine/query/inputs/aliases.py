"""--aliases FILE: other spellings of a person's name, mapped to the name the candidates know.

A CSV with header `alias,name`. Each alias is matched like a person's name is identified (`name_key`:
NFC, letter case ignored) against the person names `query` finds (a folder's name with `_` read as a space,
a faces list's `name`) and the names of `--labels`; a match is read as `name`, spelt as the file spells it.

The mapping is one step: a name that is itself an alias of another name (an alias chain) is refused, since
which of the two a photo ends under would depend on how often the map is applied. An alias that only changes
letter case (`anna smith,Anna Smith`) is no chain: it respells a name. Two persons that map to one name are
merged (`roots.merge_parts`); aliases that match nothing are counted, not refused (one file may serve several
datasets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...candidates.names_file import check_name, normalize_name
from ...disk.textfiles import iter_csv_rows
from ...errors import InputError
from ..images import name_key

ALIAS_COLUMNS = ("alias", "name")


@dataclass(frozen=True)
class Alias:
    """One row of the aliases file."""

    alias: str  # as written (NFC, stripped)
    name: str  # the name it stands for, as written
    line: int  # where in the file


@dataclass
class AliasTable:
    """The aliases of one file, by `name_key` of the alias, and which of them were used."""

    path: Path | None
    by_key: dict[str, Alias] = field(default_factory=dict)
    used: dict[str, str] = field(default_factory=dict)  # alias key -> what it was found in (first use)

    def resolve(self, name: str, where: str) -> str:
        """The name `name` stands for (itself when it is no alias); records the use, found in `where`."""
        alias = self.by_key.get(name_key(name))
        if alias is None:
            return name
        self.used.setdefault(name_key(name), where)
        return alias.name

    def unused(self) -> list[Alias]:
        return [a for key, a in self.by_key.items() if key not in self.used]


def read_aliases(path: Path) -> AliasTable:
    """The aliases file; InputError naming file:line for an empty cell, an alias listed with two names, or an
    alias whose name is itself an alias."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"aliases file {path} does not exist or is not a file")
    table = AliasTable(path)
    for lineno, row in iter_csv_rows(path, ALIAS_COLUMNS, "aliases file"):
        alias, name = normalize_name(row.get("alias") or ""), normalize_name(row.get("name") or "")
        for what, value in (("alias", alias), ("name", name)):
            if not value:
                raise InputError(f"{path}:{lineno}: empty {what}; every row needs an alias and the name it stands for")
            check_name(value, where=f"{path}:{lineno}")
        earlier = table.by_key.get(name_key(alias))
        if earlier is not None and earlier.name != name:
            raise InputError(f"{path}:{lineno}: alias {alias!r} is listed with two names ({earlier.name!r} on line "
                             f"{earlier.line}, {name!r} here); keep one")
        if earlier is None:
            table.by_key[name_key(alias)] = Alias(alias, name, lineno)
    for alias in sorted(table.by_key.values(), key=lambda a: a.line):
        target = table.by_key.get(name_key(alias.name))
        if target is not None and name_key(target.name) != name_key(alias.name):
            raise InputError(f"{path}:{alias.line}: alias {alias.alias!r} stands for {alias.name!r}, which is itself "
                             f"an alias (of {target.name!r}, line {target.line}); map every alias straight to its name")
    return table


def alias_labels(labels: dict[str, bool], table: AliasTable, labels_file: Path) -> dict[str, bool]:
    """--labels with every aliased name read as its name; a name labelled both ways through aliases is refused."""
    out: dict[str, bool] = {}
    spelt: dict[str, str] = {}  # resolved name -> the label file's name that gave it first
    for name, member in labels.items():
        target = table.resolve(name, str(labels_file))
        if target in out and out[target] != member:
            raise InputError(f"labels file {labels_file} labels {spelt[target]!r} and {name!r} differently, and "
                             f"aliases file {table.path} makes both {target!r}; label one person once")
        out.setdefault(target, member)
        spelt.setdefault(target, name)
    return out
