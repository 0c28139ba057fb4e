"""Several sources of one person's photos made into one person: faces folders given together (`query
actors/ actresses/`) and names that `--aliases` maps to one name.

Persons are identified as within one folder (`images.name_key`: NFC, letter case ignored), after aliases:
the parts of one person are merged, their photos in the order the parts were found (the roots in the order
given; within a root, its persons in name order), and the person is spelt as the first part spells it (an
alias's name as the aliases file writes it). Within one root, two folders differing only in letter case stay
an error (`collect_from_folder`): that is a typo, not a second source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..images import name_key
from .aliases import AliasTable
from .crop import FaceBox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PersonPart:
    """One person's photos as one source has them."""

    name: str  # as the source names them (a folder's name with `_` as a space; a faces list's name)
    source: str  # the faces folder or faces list
    paths: list[Path]
    boxes: list[FaceBox] | None = None  # faces list: the face box of each photo


@dataclass(frozen=True)
class MergedPersons:
    """The persons of all parts, sorted by name, with what was merged and which aliases were applied."""

    persons: dict[str, list[Path]]
    boxes: dict[str, list[FaceBox]] | None  # parallel to `persons` when every part has boxes
    merged: list[dict]  # {"person", "parts": [{"name", "source", "photos"}]} of persons made of several parts
    aliases_applied: list[dict]  # {"alias", "name", "source"} per part renamed by an alias


def merge_parts(parts: list[PersonPart], aliases: AliasTable) -> MergedPersons:
    spelling: dict[str, str] = {}  # name key -> the person's name (first part's)
    members: dict[str, list[PersonPart]] = {}
    applied = []
    for part in parts:
        name = aliases.resolve(part.name, part.source)
        if name != part.name:
            applied.append({"alias": part.name, "name": name, "source": part.source})
        key = name_key(name)
        spelling.setdefault(key, name)
        members.setdefault(key, []).append(part)
    with_boxes = all(p.boxes is not None for p in parts)
    persons, boxes, merged = {}, ({} if with_boxes else None), []
    for key in sorted(spelling, key=lambda k: spelling[k]):
        name, group = spelling[key], members[key]
        persons[name] = [p for part in group for p in part.paths]
        if boxes is not None:
            boxes[name] = [b for part in group for b in part.boxes]
        if len(group) > 1:
            merged.append({"person": name, "parts": [{"name": p.name, "source": p.source, "photos": len(p.paths)}
                                                     for p in group]})
    if merged:
        m = merged[0]
        log.warning("%d person(s) merged from several folders or names (e.g. %r from %s); summary.json lists them "
                    "under inputs.persons_merged", len(merged), m["person"],
                    " and ".join(f"{p['name']!r} in {p['source']}" for p in m["parts"]))
    return MergedPersons(persons, boxes, merged, applied)
