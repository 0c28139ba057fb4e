"""Prompt templates: the 21 of paper mode, and validation of user-supplied template files.

A template holds exactly one placeholder, `{0}` (or `{}`), that the full name replaces. Internally every
template is stored with `{0}`; prompts are rendered by plain substitution, never `str.format`, so names
containing braces are safe.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..disk.textfiles import decode_utf8, read_input_bytes
from ..errors import InputError

# Paper mode, in this order (Hintersdorf et al., JAIR 2024; docs/attack.md, step 1). Do not edit.
PAPER_TEMPLATES: tuple[str, ...] = (
    "{0}",
    "an image of {0}",
    "a photo of {0}",
    "{0} on a photo",
    "a photo of a person named {0}",
    "a person named {0}",
    "a man named {0}",
    "a woman named {0}",
    "the name of the person is {0}",
    "a photo of a person with the name {0}",
    "{0} at a gala",
    "a photo of the celebrity {0}",
    "actor {0}",
    "actress {0}",
    "a colored photo of {0}",
    "a black and white photo of {0}",
    "a cool photo of {0}",
    "a cropped photo of {0}",
    "a cropped image of {0}",
    "{0} in a suit",
    "{0} in a dress",
)

PLACEHOLDER = "{0}"
_BRACED = re.compile(r"\{[^{}]*\}")


def normalize_template(template: str, *, where: str = "template") -> str:
    """Return `template` with its single placeholder written as `{0}`; raise InputError otherwise."""
    fields = _BRACED.findall(template)
    if not fields:
        raise InputError(f"{where}: {template!r} has no placeholder; write the name's place as {{0}} or {{}}")
    if len(fields) > 1:
        raise InputError(
            f"{where}: {template!r} has {len(fields)} placeholders; a template takes exactly one ({{0}} or {{}})"
        )
    if fields[0] not in ("{0}", "{}"):
        raise InputError(f"{where}: {template!r} uses placeholder {fields[0]}; only {{0}} or {{}} is valid")
    rest = template.replace(fields[0], "", 1)
    if "{" in rest or "}" in rest:
        raise InputError(f"{where}: {template!r} has a stray brace; only one {{0}} or {{}} placeholder is allowed")
    return template.replace(fields[0], PLACEHOLDER, 1)


def render(template: str, name: str) -> str:
    """The prompt for `name` under a normalised template."""
    return template.replace(PLACEHOLDER, name, 1)


def load_templates(path: Path) -> tuple[str, ...]:
    """Read a templates file: UTF-8, one template per line, blank lines and `#` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"templates file {path} does not exist or is not a file")
    text = decode_utf8(read_input_bytes(path, "templates file"), path, "templates file")
    templates: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        template = normalize_template(line, where=f"{path}:{lineno}")
        if template in first_line:
            raise InputError(f"{path}:{lineno}: template {template!r} repeats line {first_line[template]}; "
                             "each template must be distinct")
        first_line[template] = lineno
        templates.append(template)
    if not templates:
        raise InputError(f"templates file {path} holds no template (only blank lines or # comments)")
    return tuple(templates)
