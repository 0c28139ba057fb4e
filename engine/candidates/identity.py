"""Which names the model cannot tell apart: identity is the token ids the model's tokenizer gives a name.

open_clip's tokenizers clean a prompt before tokenising it: ftfy's `fix_text` (mojibake, full-width
letters, ligatures, control characters such as a byte-order mark), HTML unescaping (twice: `&amp;amp;`
is `&`), surrounding whitespace stripped and runs of whitespace collapsed, and for most models lower-casing
(`clean="lower"`; `"canonicalize"` also drops punctuation). Their BPE then gives every word and every run
of punctuation its own tokens, so `Jean-Paul` and `Jean - Paul` are the same tokens too. Two names with the
same token ids get the same prompt under every template whose placeholder stands apart from its words
(the 21 of paper mode), hence the same embedding: the index cannot tell them apart, and the earlier one
(lower id) wins every tie. So such names are one candidate (`build-index` drops the later, `query` matches
a person to the index name with their tokens), and comparing strings, even NFC ones, is not enough.

Tokenising 10^6 names costs about 40 s on a 2-core CPU (ftfy dominates), so for open_clip's
SimpleTokenizer the names are first grouped by a cheap *skeleton*, and only names sharing a skeleton with
another are tokenised. The skeleton is the cleaned text lower-cased with everything but letters and digits
dropped: equal token ids imply an equal skeleton, since the tokenizer's word pattern covers every character
but whitespace and byte-level BPE is lossless. For a name of printable ASCII without `&`, ftfy and HTML
unescaping change nothing and the known cleanings only touch whitespace, case and punctuation, which the
skeleton drops anyway: its skeleton is computed from the name itself, without cleaning. Other tokenizers
(Hugging Face ones may map different text to one unknown token) are keyed by their token ids directly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

Key = Hashable  # what identifies a name to one tokenizer: token ids (or a cheap necessary condition)


@dataclass(frozen=True)
class TokenTwin:
    """A name with the same token ids as an earlier one: to the model they are one name."""

    name: str  # the later name (build-index drops it; query matches it to `same_tokens_as`)
    same_tokens_as: str  # the earlier name, the one kept


class NameTokens:
    """The token ids of names alone (no start, end or padding tokens, never truncated) in one model's
    tokenizer, and the groups of names that share them."""

    def __init__(self, tokenizer: Callable):
        self.tokenizer = tokenizer
        self._encode = _plain_encoder(tokenizer)
        clean = getattr(tokenizer, "clean_fn", None)
        # The skeleton shortcut is proved for open_clip's own cleanings only (module docstring).
        self._clean = clean if self._encode is not None and getattr(clean, "__name__", "") in _KNOWN_CLEANINGS \
            else None

    def keys(self, names: Sequence[str]) -> list[Key]:
        """The token ids of each name, as a tuple."""
        if self._encode is not None:
            return [tuple(self._encode(n)) for n in names]
        return _batched_keys(self.tokenizer, list(names))

    def skeletons(self, names: Sequence[str]) -> list[Key]:
        """A key per name that is equal whenever the token ids are (and cheap for plain names)."""
        if self._clean is None:
            return self.keys(names)
        clean = self._clean
        return [_letters_and_digits(n if _is_plain(n) else clean(n)) for n in names]

    def twins(self, names: Sequence[str]) -> list[TokenTwin]:
        """Every name whose token ids equal those of an earlier name, with the first name of its tokens;
        in the order of `names`."""
        groups: dict[Key, list[int]] = defaultdict(list)
        for i, skeleton in enumerate(self.skeletons(names)):
            groups[skeleton].append(i)
        shared = sorted(i for ids in groups.values() if len(ids) > 1 for i in ids)
        first: dict[Key, int] = {}
        out: list[tuple[int, TokenTwin]] = []
        for i, key in zip(shared, self.keys([names[i] for i in shared])):
            j = first.setdefault(key, i)
            if j != i:
                out.append((i, TokenTwin(names[i], names[j])))
        return [twin for _, twin in sorted(out, key=lambda pair: pair[0])]

    def find(self, queries: Sequence[str], names: Sequence[str]) -> dict[str, int]:
        """query -> the first id in `names` with the query's token ids, for the queries that have one."""
        wanted: dict[Key, list[str]] = defaultdict(list)
        for query, skeleton in zip(queries, self.skeletons(queries)):
            wanted[skeleton].append(query)
        if not wanted:
            return {}
        maybe = [i for i, skeleton in enumerate(self.skeletons(names)) if skeleton in wanted]
        first: dict[Key, int] = {}
        for i, key in zip(maybe, self.keys([names[i] for i in maybe])):
            first.setdefault(key, i)
        return {q: first[k] for q, k in zip(queries, self.keys(queries)) if k in first}


# open_clip.tokenizer's cleaning functions (get_clean_fn): whitespace, lower, canonicalize.
_KNOWN_CLEANINGS = {"_clean_whitespace", "_clean_lower", "_clean_canonicalize"}


def _is_plain(name: str) -> bool:
    """Printable ASCII without `&`: text that ftfy and HTML unescaping leave as it is."""
    return name.isascii() and name.isprintable() and "&" not in name


def _letters_and_digits(text: str) -> str:
    return "".join(filter(str.isalnum, text.lower()))


def _plain_encoder(tokenizer: Callable) -> Callable[[str], list[int]] | None:
    """open_clip's SimpleTokenizer.encode (cleaning included, no start/end tokens, no truncation), or None."""
    encode = getattr(tokenizer, "encode", None)
    return encode if callable(encode) and hasattr(tokenizer, "sot_token_id") else None


def _batched_keys(tokenizer: Callable, names: list[str], batch: int = 4096) -> list[Key]:
    """Token ids of names for tokenizers without a plain encode: a Hugging Face tokenizer behind open_clip's
    wrapper (cleaned as the wrapper cleans), else the wrapper's own rows (padded to its context)."""
    hf = getattr(tokenizer, "tokenizer", None)
    out: list[Key] = []
    if hf is not None and callable(hf):
        clean = getattr(tokenizer, "clean_fn", None)
        if clean is None:  # SigLipTokenizer cleans inline, like this
            from open_clip.tokenizer import basic_clean, canonicalize_text

            def clean(text: str) -> str:
                return canonicalize_text(basic_clean(text))
        for start in range(0, len(names), batch):
            cleaned = [clean(n) for n in names[start:start + batch]]
            out += [tuple(ids) for ids in hf(cleaned, add_special_tokens=False, truncation=False)["input_ids"]]
        return out
    for start in range(0, len(names), batch):
        out += [tuple(int(t) for t in row) for row in tokenizer(names[start:start + batch])]
    return out
