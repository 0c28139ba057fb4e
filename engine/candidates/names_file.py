"""Reading candidate names: the names file of `build-index`.

Rules: UTF-8, one full name per line; surrounding whitespace stripped; blank lines and lines starting
with `#` ignored; names NFC-normalised (Unicode kept as written otherwise); duplicates dropped with a
warning (first occurrence kept). A name containing a tab or any other control character is an error
naming the file and line. The file is read line by line, so 10^6 names are a normal input.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import InputError

log = logging.getLogger(__name__)

# How long one name may be. Longer than any person's name (the longest in common use have well under 100
# characters, and CLIP's 77-token context truncates a prompt after about 60 words); and a bound on what one
# line of input may cost: every name is normalised, checked, tokenised in 21 templates and stored.
MAX_NAME_CHARS = 256
MAX_NAME_BYTES = 1024  # its UTF-8 encoding (4 bytes per character at most)
# A line of a names file, comments and surrounding spaces included: read at most this much of it at once.
MAX_LINE_BYTES = 64 << 10


def normalize_name(name: str) -> str:
    """The canonical form of a person's name: NFC, surrounding whitespace stripped."""
    return unicodedata.normalize("NFC", name.strip())


def name_hash64(name: str) -> int:
    """A stable 64-bit key of a name: the first 8 bytes of the SHA-256 of its UTF-8, little-endian.

    Seeded draws per person (query's --images-per-person, evaluate's draws) mix it into their seed, so that a
    person's draw depends on nothing but the seed and the name."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def check_name(name: str, *, where: str) -> None:
    """Raise InputError if `name` is empty or has a control character (tab, NUL, ...) or line separator."""
    if not name:
        raise InputError(f"{where}: empty name")
    # Before anything that walks the name: its cost must be bounded by these limits, not by the input.
    if len(name) > MAX_NAME_CHARS or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InputError(f"{where}: name {name[:40]!r}... has {len(name)} characters; a name may have at most "
                         f"{MAX_NAME_CHARS} characters ({MAX_NAME_BYTES} bytes of UTF-8)")
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            raise InputError(
                f"{where}: name {name!r} contains control character U+{ord(ch):04X}; "
                "names must be plain text on one line (no tabs or control characters)"
            )


@dataclass
class NameList:
    """The distinct names of a names file, in first-occurrence order."""

    names: list[str]
    duplicates_dropped: int = 0
    duplicate_examples: list[str] = field(default_factory=list)


def iter_name_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, normalised name) for every name line of `path`, validating as it goes."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"names file {path} does not exist; give a UTF-8 text file, one name per line")
    if not path.is_file():
        raise InputError(f"names file {path} is not a regular file (a directory?); give a UTF-8 text file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"names file {path} cannot be read ({e.strerror or e}); give a readable UTF-8 text file") from None
    with f:
        # readline with a limit: one huge line is refused after reading MAX_LINE_BYTES of it, not all of it.
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 3), b""), start=1):
            if len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
                raise InputError(f"{path}:{lineno}: line is longer than {MAX_LINE_BYTES} bytes; a names file "
                                 f"holds one name (at most {MAX_NAME_CHARS} characters) per line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "save the names file as UTF-8"
                ) from None
            # A byte-order mark opens a file, and so also any line where two files were concatenated.
            line = line.removeprefix("\ufeff")
            line = line.rstrip("\r\n")
            stripped = line.strip(" \t")  # a tab inside a name is an error, around it just whitespace
            if not stripped or stripped.startswith("#"):
                continue
            name = normalize_name(stripped)
            check_name(name, where=f"{path}:{lineno}")
            yield lineno, name


def read_names(path: Path) -> NameList:
    """Read, validate and de-duplicate the names of `path`; raise InputError if none remain."""
    seen: set[str] = set()
    names: list[str] = []
    dropped = 0
    examples: list[str] = []
    for _, name in iter_name_lines(path):
        if name in seen:
            dropped += 1
            if len(examples) < 10:
                examples.append(name)
            continue
        seen.add(name)
        names.append(name)
    if not names:
        raise InputError(f"names file {path} holds no name (it is empty or has only blank lines and # comments)")
    if dropped:
        log.warning(
            "%s: dropped %d duplicate name(s), first occurrence kept (e.g. %s)",
            path, dropped, ", ".join(repr(n) for n in examples[:3]),
        )
    return NameList(names=names, duplicates_dropped=dropped, duplicate_examples=examples)
