"""The photos of a query from several places: faces folders given together, --aliases, a FaceScrub-style
--faces-list with its face boxes, and --crop.

    collect.py      collect_photo_inputs: the one entry, used by `run.py` only when one of these is asked for
    roots.py        parts of one person (several folders, aliases) merged into one person
    aliases.py      the aliases file (alias,name) and its one-step mapping
    faces_list.py   the FaceScrub list: its lines, where their files are, their SHA-256 checked
    crop.py         face boxes: the cut, the store key and namespace of a crop, its dataset
"""

from .collect import PhotoInputs, collect_photo_inputs, uses_photo_inputs

__all__ = ["PhotoInputs", "collect_photo_inputs", "uses_photo_inputs"]
