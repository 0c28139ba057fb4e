"""The photos of a query given as several faces folders, with --aliases or through --faces-list: one
ImageCollection as `images.collect_from_folder` makes one, plus what summary.json says about how it was made.

A query with one faces folder and none of these options never comes here (`uses_photo_inputs`): it is
collected as it always was, and its report is byte for byte what it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import InputError
from ..images import ImageCollection, Skipped, collect_from_folder
from .aliases import AliasTable, alias_labels, read_aliases
from .crop import CROPS_CSV, CROPS_CSV_DESCRIPTION, CropPlan
from .faces_list import find_listed_photos, read_faces_list
from .roots import PersonPart, merge_parts


@dataclass(frozen=True)
class PhotoInputs:
    """Stage 1 of a query over several roots, aliases or a faces list."""

    collection: ImageCollection
    crops: CropPlan | None  # --crop: the face box of every photo; None: photos are whole files
    aliases: AliasTable
    roots: list[Path]
    faces_list: Path | None
    section: dict  # summary.json's "inputs": roots, aliases, merges, the faces list's counts

    def labels(self, labels: dict[str, bool] | None, labels_file: Path | None) -> dict[str, bool] | None:
        """--labels with aliases applied (before `summary`, which counts the aliases used)."""
        return labels if labels is None else alias_labels(labels, self.aliases, labels_file)

    def parameters(self) -> dict:
        """Added to summary.json's "parameters": where the photos came from, and how."""
        return {"faces_roots": [str(r) for r in self.roots],
                "aliases_file": None if self.aliases.path is None else str(self.aliases.path),
                "faces_list": None if self.faces_list is None else str(self.faces_list),
                "crop": self.crops is not None}

    def summary(self) -> dict:
        """summary.json's "inputs" section, with the aliases' use counted over photos and labels."""
        unused = self.aliases.unused()
        aliases = None if self.aliases.path is None else {
            "file": str(self.aliases.path), "listed": len(self.aliases.by_key), "used": len(self.aliases.used),
            "unused": len(unused), "unused_aliases": [a.alias for a in unused]}
        return {**self.section, "aliases": aliases}

    def files(self) -> dict[str, str]:
        """Report files beyond the usual ones (summary.json's "files" lists them, so a rerun may replace them)."""
        return {CROPS_CSV: CROPS_CSV_DESCRIPTION} if self.crops is not None else {}


def uses_photo_inputs(roots: list[Path], aliases_file: Path | None, faces_list: Path | None) -> bool:
    return len(roots) > 1 or aliases_file is not None or faces_list is not None


def collect_photo_inputs(roots: list[Path], aliases_file: Path | None = None, faces_list: Path | None = None,
                         crop: bool = False) -> PhotoInputs:
    """Every person's photos from the roots (or the faces list's files under them), aliases applied, persons
    of several parts merged."""
    roots = [Path(r) for r in roots]
    aliases = read_aliases(aliases_file) if aliases_file is not None else AliasTable(None)
    skipped: list[Skipped] = []
    section: dict = {"roots": [str(r) for r in roots]}
    if faces_list is not None:
        for root in roots:  # a missing root would only show as every face not found
            _check_root(root)
        listed = find_listed_photos(Path(faces_list), read_faces_list(faces_list), roots)
        parts = [PersonPart(name, str(faces_list), [p for p, _ in faces], [b for _, b in faces])
                 for name, faces in listed.persons.items()]
        skipped += listed.skipped
        section["faces_list"] = {"file": str(faces_list), "faces_listed": listed.lines,
                                 "faces_found": sum(len(v) for v in listed.persons.values()),
                                 "not_found": listed.not_found, "sha256_differs": listed.sha256_differs}
        source = str(faces_list)
    else:
        parts = []
        for root in roots:
            found = collect_from_folder(root)
            skipped += found.skipped
            parts += [PersonPart(name, str(root), paths) for name, paths in found.persons.items()]
        source = str(roots[0]) if len(roots) == 1 else " + ".join(str(r) for r in roots)
    merged = merge_parts(parts, aliases)
    section["aliases_applied"] = merged.aliases_applied
    section["persons_merged"] = merged.merged
    crops = CropPlan(merged.boxes) if crop else None
    return PhotoInputs(ImageCollection(merged.persons, skipped, source), crops, aliases, roots,
                       None if faces_list is None else Path(faces_list), section)



def _check_root(root: Path) -> None:
    if not root.exists():
        raise InputError(f"faces folder {root} does not exist")
    if not root.is_dir():
        raise InputError(f"faces folder {root} is not a directory; give the folder the faces list's files are under")
