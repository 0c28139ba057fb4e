"""Prompts longer than the model's context: found exactly, without tokenising every prompt."""

from __future__ import annotations

import random
import time
from collections import defaultdict

import open_clip
import pytest
from idia_engine.engine.candidates.made_up import generate_names
from idia_engine.engine.candidates.prompt_lengths import check_prompt_lengths
from idia_engine.engine.candidates.templates import PAPER_TEMPLATES, render
from idia_engine.engine.demo.tiny_model import TINY_MODEL_CONFIG, tiny_names

TEMPLATES = list(PAPER_TEMPLATES)
GLUED = ["{0}'s photo", "({0})", "photo:{0}.jpg"]  # the placeholder touching other characters


@pytest.fixture(scope="module")
def vit_tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")  # SimpleTokenizer, context 77; offline


def brute_force(tokenizer, templates, names, context):
    """Every prompt tokenised: (names cut, cut prompts per template, collision groups as sets)."""
    cut, per_template, rows = set(), [0] * len(templates), defaultdict(set)
    for t, template in enumerate(templates):
        for name in names:
            prompt = render(template, name)
            n = len(tokenizer.encode(prompt)) + 2
            if n > context:
                cut.add(name)
                per_template[t] += 1
            if n >= context:
                rows[(t, tuple(tokenizer([prompt], context_length=context)[0].tolist()))].add(name)
    groups = {(t, frozenset(v)) for (t, _), v in rows.items() if len(v) > 1}
    return cut, per_template, groups


def test_tiny_model_long_names_are_cut_and_collide(tiny_model):
    context = TINY_MODEL_CONFIG["text_cfg"]["context_length"]
    assert tiny_model.info.context_length == context
    long = " ".join(["Anna"] * 30)
    names = tiny_names(20, seed=3) + [long + " Smith", long + " Jones"]
    report = check_prompt_lengths(tiny_model.tokenizer, TEMPLATES, names, context)
    assert report.method == "simple-bpe" and report.names_checked == 22
    assert report.truncated_names == 2 and report.truncated_prompts == 2 * len(TEMPLATES)
    assert {e.name for e in report.examples} == {long + " Smith", long + " Jones"}
    assert all(e.tokens > context for e in report.examples)
    assert report.worst_template in TEMPLATES and report.worst_template_names == 2
    # The two names differ only after the cut: identical tokens, identical embeddings, under every template.
    assert report.collision_groups == len(TEMPLATES)
    assert set(report.collisions[0].names) == {long + " Smith", long + " Jones"}
    lines = report.warning_lines()
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "2 name(s)" in lines[0] and f"context of {context} tokens" in lines[0] and "truncated" in lines[0]
    assert "identical" in lines[1] and "..." in lines[1]  # long names are shortened in the message
    # The encoder really does see one prompt for both.
    a, b = (tiny_model.tokenizer([render(TEMPLATES[2], n)]) for n in names[-2:])
    assert a.tolist() == b.tolist()


def test_short_names_give_no_warning(tiny_model):
    report = check_prompt_lengths(tiny_model.tokenizer, TEMPLATES, tiny_names(40, seed=1), 32)
    assert report.truncated_names == 0 and report.collision_groups == 0 and report.warning_lines() == []
    assert report.to_json()["truncated_per_template"] == [0] * len(TEMPLATES)


@pytest.mark.parametrize("context", [10, 14, 20, 77])
def test_matches_brute_force_on_vit_b_32(vit_tokenizer, context):
    rng = random.Random(context)
    names = rng.sample(list(generate_names(20_000, seed=1).names), 300)
    names += ["İSTANBUL İZMİR " * 3, "Zoë-Ann O'Brien-Smith", "José María de la Cruz y Fernández", "李小龙 " * 9,
              "&amp;lt; Anna &ac; Smith", "Ab " * 40, "Ab " * 40 + "X", "Maximilian " * 9 + "A", "A.B.C.D.E.F.G.H"]
    # A prompt that fills the context exactly equals a cut prompt of the same name with more after it.
    names += ["Anna " * (context - 6), "Anna " * (context - 6) + "Smith Jones"]
    templates = TEMPLATES + GLUED
    report = check_prompt_lengths(vit_tokenizer, templates, names, context)
    cut, per_template, groups = brute_force(vit_tokenizer, templates, names, context)
    assert report.truncated_names == len(cut)
    assert report.truncated_per_template == per_template
    assert report.collision_groups == len(groups)
    found = {(templates.index(c.template), frozenset(c.names)) for c in report.collisions}
    assert found <= groups
    # And it did not tokenise everything: at the real context almost nothing needs it.
    if context == 77:
        assert report.prompts_tokenized < len(names) * len(templates) // 10


def test_a_million_names_times_21_templates_is_cheap(vit_tokenizer):
    names = list(generate_names(1_000_000, seed=42).names)
    names += ["Anna " * 80, "Anna " * 80 + "Smith"]
    start = time.perf_counter()
    report = check_prompt_lengths(vit_tokenizer, TEMPLATES, names, 77)
    elapsed = time.perf_counter() - start
    assert report.truncated_names == 2 and report.collision_groups == len(TEMPLATES)
    assert report.prompts_tokenized < 10_000
    assert elapsed < 10.0, f"{elapsed:.1f} s for 10^6 names x 21 templates"  # about 0.1 s measured


class FakeHF:
    """What check_prompt_lengths needs of open_clip's HFTokenizer: .tokenizer (a Hugging Face tokenizer,
    here one id per word plus [CLS]/[SEP]), .clean_fn, and __call__ (cut to the context)."""

    def __init__(self, context: int):
        self.context_length = context
        self.clean_fn = lambda text: " ".join(text.split())
        self.tokenizer = self._hf

    @staticmethod
    def _ids(text: str) -> list[int]:
        return [sum(map(ord, w)) for w in text.split()]

    def _hf(self, texts, add_special_tokens=True, truncation=False):
        assert truncation is False
        return {"input_ids": [([101] if add_special_tokens else []) + self._ids(t) + ([102] if add_special_tokens else [])
                              for t in texts]}

    def __call__(self, texts, context_length=None):
        import torch

        c = context_length or self.context_length
        out = torch.zeros(len(texts), c, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [101] + self._ids(self.clean_fn(t))[: c - 2] + [102]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def test_hugging_face_tokenizer_is_checked_exactly():
    names = ["Anna Smith", "word " * 20 + "A", "word " * 20 + "B", "Bo"]
    report = check_prompt_lengths(FakeHF(16), ["a photo of {0}", "{0}"], names, 16)
    assert report.method == "hf"
    # "a photo of" + 21 words + 2 specials = 26 > 16; "{0}" alone: 21 + 2 = 23 > 16.
    assert report.truncated_names == 2 and report.truncated_per_template == [2, 2]
    assert report.collision_groups == 2


def test_a_tokenizer_without_token_counts_is_skipped_with_a_reason():
    report = check_prompt_lengths(lambda texts, context_length=None: None, TEMPLATES, ["Anna"], 77)
    assert report.method == "skipped" and "function" in report.skipped_reason
    assert report.warning_lines() == [f"prompt lengths not checked: {report.skipped_reason}"]


def test_names_added_later_are_checked_against_the_earlier_ones(tiny_model):
    """Query's names added for a run: only they are reported, and a collision counts when one of them is in it."""
    long = " ".join(["Anna"] * 30)
    index_names = tiny_names(10, seed=3) + [long + " Smith", long + " Brown"]  # cut and colliding at build time
    added = ["Mei Kim", long + " Jones"]
    report = check_prompt_lengths(tiny_model.tokenizer, TEMPLATES, index_names + added, 32,
                                  checked_before=len(index_names))
    assert report.names_checked == 2 and report.truncated_names == 1
    assert [e.name for e in report.examples] == [long + " Jones"]
    assert report.collision_groups == len(TEMPLATES)  # the added name joins the index's group in every template
    assert set(report.collisions[0].names) == {long + " Smith", long + " Brown", long + " Jones"}
    alone = check_prompt_lengths(tiny_model.tokenizer, TEMPLATES, index_names + ["Mei Kim"], 32,
                                 checked_before=len(index_names))
    assert alone.truncated_names == 0 and alone.collision_groups == 0 and alone.warning_lines() == []
