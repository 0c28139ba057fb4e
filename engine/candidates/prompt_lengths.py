"""Prompts longer than the model's text context: found without tokenising every (template, name) prompt.

open_clip's tokenizers silently cut a prompt to the context length (77 tokens for most CLIPs). A name
whose prompt is cut loses its end, and two different names whose cut prompts are the same token ids get
the same embedding: the index cannot tell them apart ("collide").

Tokenising 10^6 names x 21 templates to find the few long ones would cost minutes, so an upper bound
on each prompt's length is computed from byte counts first and only prompts whose bound reaches the
context are tokenised exactly:
- a BPE token of open_clip's SimpleTokenizer covers at least one UTF-8 byte of the cleaned text, and
  cleaning (ftfy, HTML unescaping, lower-casing) makes an NFC name at most 1.5x longer in bytes
  (e.g. U+0130 lower-cases to two code points), so a name adds at most 2 x its UTF-8 length in tokens;
  the template's own words are counted exactly (a word touching the placeholder by its bytes);
- a Hugging Face tokenizer (open_clip's HFTokenizer, SigLipTokenizer) has byte-fallback or word-start
  tokens, so its bound is 2 x bytes + words, for the template and the name alike.
Exact lengths come from the tokenizer itself without truncation; the cut token ids that decide
collisions come from calling the tokenizer exactly as the text encoder does.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .templates import PLACEHOLDER, render

_BYTES_FACTOR = 2  # tokens per UTF-8 byte of a name, at most (1.5x cleaning growth, rounded up)
_MAX_EXAMPLES = 10


@dataclass(frozen=True)
class TruncatedName:
    """A name whose prompt is cut under at least one template."""

    name: str
    tokens: int  # its longest prompt, in tokens (start and end tokens included)
    template: str  # the template of that prompt


@dataclass(frozen=True)
class Collision:
    """Different names whose cut prompts under `template` are the same tokens (same embedding)."""

    template: str
    names: tuple[str, ...]


@dataclass
class PromptLengthReport:
    """What `check_prompt_lengths` found; `warning_lines()` says it in one line per finding."""

    context_length: int
    names_checked: int
    templates_checked: int
    method: str  # "simple-bpe", "hf", or "skipped"
    prompts_tokenized: int = 0  # (template, name) prompts tokenised exactly (the rest ruled out by the bound)
    truncated_names: int = 0  # names cut under at least one template
    truncated_prompts: int = 0  # (template, name) prompts cut
    truncated_per_template: list[int] = field(default_factory=list)
    examples: list[TruncatedName] = field(default_factory=list)  # the longest first
    worst_template: str | None = None  # the template that cuts the most names
    worst_template_names: int = 0  # how many names it cuts
    collision_groups: int = 0  # groups of different names with identical cut prompts (over all templates)
    collisions: list[Collision] = field(default_factory=list)  # the first few groups
    skipped_reason: str | None = None  # why nothing was checked (method "skipped")
    seconds: float = 0.0

    def warning_lines(self) -> list[str]:
        """One-line warnings for the CLI and the build log; empty when every prompt fits."""
        if self.skipped_reason:
            return [f"prompt lengths not checked: {self.skipped_reason}"]
        lines = []
        if self.truncated_names:
            shown = ", ".join(f"{_short(e.name)} ({e.tokens} tokens)" for e in self.examples[:3])
            lines.append(
                f"{self.truncated_names} name(s) make prompts longer than the model's context of "
                f"{self.context_length} tokens and would be truncated (e.g. {shown}); template "
                f"{self.worst_template!r} cuts the most ({self.worst_template_names}); shorten or drop these names"
            )
        if self.collision_groups:
            c = self.collisions[0]
            lines.append(
                f"{self.collision_groups} group(s) of different names get identical truncated prompts and so identical "
                f"embeddings (e.g. {' = '.join(_short(n) for n in c.names[:3])} under {c.template!r}); the index "
                "cannot tell them apart"
            )
        return lines

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary (for a manifest)."""
        return {
            "context_length": self.context_length, "names_checked": self.names_checked,
            "templates_checked": self.templates_checked, "method": self.method,
            "prompts_tokenized": self.prompts_tokenized, "truncated_names": self.truncated_names,
            "truncated_prompts": self.truncated_prompts, "truncated_per_template": self.truncated_per_template,
            "examples": [{"name": e.name, "tokens": e.tokens, "template": e.template} for e in self.examples],
            "worst_template": self.worst_template, "worst_template_names": self.worst_template_names,
            "collision_groups": self.collision_groups,
            "collisions": [{"template": c.template, "names": list(c.names)} for c in self.collisions],
            "skipped_reason": self.skipped_reason, "seconds": round(self.seconds, 3),
        }


def check_prompt_lengths(tokenizer, templates: list[str], names: list[str], context_length: int,
                         checked_before: int = 0) -> PromptLengthReport:
    """Find the (template, name) prompts longer than `context_length` tokens and the names they make collide.

    `templates` are normalised (one `{0}` placeholder); `names` are NFC. Only prompts whose byte bound
    reaches the context are tokenised (see the module docstring); 10^6 typical names cost a second.
    `checked_before`: the first names were checked already (an index's, at build time; query adds names
    after them): only the later names are reported as cut, and only collisions that involve one of them.
    """
    t0 = time.perf_counter()
    templates = list(templates)
    report = PromptLengthReport(context_length=int(context_length), names_checked=len(names) - checked_before,
                                templates_checked=len(templates), method="skipped",
                                truncated_per_template=[0] * len(templates))
    plan = _template_token_plan(tokenizer, templates)
    if isinstance(plan, str):
        report.skipped_reason = plan
        report.seconds = time.perf_counter() - t0
        return report
    method, fixed, name_bound, exact_length = plan
    report.method = method
    bound = name_bound(names) if names else np.zeros(0, np.int64)

    longest: dict[int, tuple[int, int]] = {}  # name id -> (tokens, template id) of its longest cut prompt
    groups: dict[tuple[int, tuple], set[int]] = defaultdict(set)  # (template, cut ids) -> name ids
    for t, template in enumerate(templates):
        candidates = np.nonzero(bound + fixed[t] >= context_length)[0]
        if not len(candidates) or candidates[-1] < checked_before:  # no later name can fill the context here
            continue
        prompts = [render(template, names[i]) for i in candidates]
        lengths = exact_length(prompts)
        report.prompts_tokenized += len(prompts)
        full = [(int(i), p, n) for i, p, n in zip(candidates, prompts, lengths) if n >= context_length]
        for i, _, n in full:
            if n > context_length and i >= checked_before:
                report.truncated_prompts += 1
                report.truncated_per_template[t] += 1
                if i not in longest or n > longest[i][0]:
                    longest[i] = (n, t)
        if full:  # prompts that fill the context exactly can equal a cut one
            rows = tokenizer([p for _, p, _ in full], context_length=context_length)
            for (i, _, _), row in zip(full, rows):
                groups[(t, tuple(int(x) for x in row))].add(i)

    report.truncated_names = len(longest)
    ranked = sorted(longest.items(), key=lambda kv: (-kv[1][0], kv[0]))[:_MAX_EXAMPLES]
    report.examples = [TruncatedName(names[i], n, templates[t]) for i, (n, t) in ranked]
    if longest:
        counts = report.truncated_per_template  # per template, the names it cuts (one prompt per name)
        worst = max(range(len(templates)), key=lambda t: (counts[t], -t))
        report.worst_template, report.worst_template_names = templates[worst], counts[worst]
    colliding = [(t, sorted(ids)) for (t, _), ids in groups.items() if len(ids) > 1 and max(ids) >= checked_before]
    colliding.sort(key=lambda g: (g[0], g[1][0]))
    report.collision_groups = len(colliding)
    report.collisions = [Collision(templates[t], tuple(names[i] for i in ids)) for t, ids in colliding[:_MAX_EXAMPLES]]
    report.seconds = time.perf_counter() - t0
    return report


def _short(name: str, keep: int = 40) -> str:
    """A name for a one-line message: repr, cut in the middle when long."""
    if len(name) <= keep:
        return repr(name)
    return repr(name[:keep // 2]) + "..." + repr(name[-keep // 2:])


def _utf8_lengths(texts: list[str]) -> np.ndarray:
    return np.fromiter((len(s.encode("utf-8")) for s in texts), np.int64, count=len(texts))


def _word_counts(texts: list[str]) -> np.ndarray:
    return np.fromiter((len(s.split()) for s in texts), np.int64, count=len(texts))


def _split_template(template: str) -> tuple[str, str, str, str]:
    """(prefix words, prefix part touching the name, suffix part touching the name, suffix words).

    Words separated from the placeholder by whitespace are tokenised on their own, as in the prompt; a
    word glued to the placeholder ("{0}'s") may merge with the name, so only its bytes bound it."""
    prefix, suffix = template.split(PLACEHOLDER, 1)
    m = re.search(r"\S*$", prefix)
    n = re.match(r"\S*", suffix)
    return prefix[:m.start()], prefix[m.start():], suffix[:n.end()], suffix[n.end():]


def _template_token_plan(tokenizer, templates: list[str]):
    """(method, fixed tokens per template, name bound function, exact length function), or why not."""
    if callable(getattr(tokenizer, "encode", None)) and hasattr(tokenizer, "sot_token_id"):
        encode: Callable[[str], list[int]] = tokenizer.encode
        fixed = []
        for template in templates:
            head, glued_left, glued_right, tail = _split_template(template)
            glued = len((glued_left + glued_right).encode("utf-8"))
            fixed.append(len(encode(head)) + len(encode(tail)) + _BYTES_FACTOR * glued + 2)  # + start, end
        return ("simple-bpe", np.array(fixed, np.int64), lambda names: _BYTES_FACTOR * _utf8_lengths(names),
                lambda prompts: [len(encode(p)) + 2 for p in prompts])
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and callable(hf):
        clean = getattr(tokenizer, "clean_fn", None)
        if clean is None:  # SigLipTokenizer cleans inline
            from open_clip.tokenizer import basic_clean, canonicalize_text

            def clean(text: str) -> str:
                return canonicalize_text(basic_clean(text))
        clips_mode = getattr(tokenizer, "tokenizer_mode", "") == "clips"
        specials = 4  # start/end/class tokens, with a margin
        fixed = []
        for template in templates:
            rest = template.replace(PLACEHOLDER, " ")
            fixed.append(_BYTES_FACTOR * len(rest.encode("utf-8")) + len(rest.split()) + specials)

        def exact_length(prompts: list[str]) -> list[int]:
            cleaned = [clean(p) for p in prompts]
            if clips_mode:  # open_clip keeps context - 3 content tokens, then bos, eos, class
                ids = hf(cleaned, add_special_tokens=False, truncation=False)["input_ids"]
                return [len(x) + 3 for x in ids]
            ids = hf(cleaned, add_special_tokens=True, truncation=False)["input_ids"]
            return [len(x) for x in ids]

        return ("hf", np.array(fixed, np.int64),
                lambda names: _BYTES_FACTOR * _utf8_lengths(names) + _word_counts(names), exact_length)
    return (f"tokenizer {type(tokenizer).__name__} offers no untruncated token count (neither encode() nor a "
            "Hugging Face tokenizer)")
