"""Which candidate names a caption contains, as whole words, for 10^5-10^6 names at once.

One Aho-Corasick automaton (pyahocorasick) holds every normalised name, so the cost of a caption grows
with its length and its matches, not with the number of names. A match counts only as whole words: the
character before it and the one after it must not be word characters (letters, digits, underscore: what
`\\w` matches in Python's `re`), unless the name itself starts or ends with a non-word character.

What "contains" means, precisely (and what the tests hold against a plain-regex oracle):
- Both the caption and the names are normalised alike: Unicode NFC, every run of whitespace one space,
  and (by default) case-folded (`str.casefold`: "ß" matches "ss"). `case_sensitive=True` keeps case.
- A caption counts once per name however often the name appears in it.
- A name inside a longer word does not count ("Ann Lee" is not in "Ann Leeds"); a name inside a longer
  *name* does ("Ann Lee" is in "Mary Ann Lee"): the caption does contain those words, and whether they
  mean the same person is not decidable from text. `nested_names` lists the candidates this can touch.
- Names that normalise to the same text (e.g. two spellings differing only in case, case-insensitively)
  get the same count.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict

import ahocorasick
import numpy as np

_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str, case_sensitive: bool) -> str:
    """NFC, whitespace runs to one space, stripped, and case-folded unless case_sensitive."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()
    return text if case_sensitive else text.casefold()


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


class NameMatcher:
    """Counts, per name, the captions that contain it as whole words."""

    def __init__(self, names: list[str], case_sensitive: bool = False):
        self.names = list(names)
        self.case_sensitive = case_sensitive
        ids_of: dict[str, list[int]] = defaultdict(list)
        for i, name in enumerate(self.names):
            key = normalize_text(name, case_sensitive)
            if key:
                ids_of[key].append(i)
        self._automaton = ahocorasick.Automaton()
        for key, ids in ids_of.items():
            # (ids, length, needs a boundary before, needs one after)
            self._automaton.add_word(key, (tuple(ids), len(key), _is_word(key[0]), _is_word(key[-1])))
        self._has_words = bool(ids_of)
        if self._has_words:
            self._automaton.make_automaton()
        self.keys = list(ids_of)

    def names_in(self, caption: str) -> set[int]:
        """The ids of the names the caption contains (as whole words)."""
        if not self._has_words or not caption:
            return set()
        text = normalize_text(caption, self.case_sensitive)
        found: set[int] = set()
        n = len(text)
        for end, (ids, length, bound_before, bound_after) in self._automaton.iter(text):
            start = end - length + 1
            if bound_before and start > 0 and _is_word(text[start - 1]):
                continue
            if bound_after and end + 1 < n and _is_word(text[end + 1]):
                continue
            found.update(ids)
        return found

    def count(self, captions, counts: np.ndarray) -> tuple[int, int]:
        """Add each caption's names to counts (int64 [names]); return (captions read, of them null/empty)."""
        rows = empty = 0
        for caption in captions:
            rows += 1
            if not caption:
                empty += 1
                continue
            for i in self.names_in(caption):
                counts[i] += 1
        return rows, empty


def nested_names(names: list[str], case_sensitive: bool = False) -> list[tuple[str, str]]:
    """(shorter, longer) pairs of candidate names where the shorter occurs as whole words inside the longer,
    so every caption of the longer also counts for the shorter. At most 1000 pairs, in names order."""
    matcher = NameMatcher(names, case_sensitive)
    pairs = []
    for i, name in enumerate(names):
        for j in sorted(matcher.names_in(name)):
            if j != i and normalize_text(names[j], case_sensitive) != normalize_text(name, case_sensitive):
                pairs.append((names[j], name))
                if len(pairs) >= 1000:
                    return pairs
    return pairs
