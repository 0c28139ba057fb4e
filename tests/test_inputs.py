"""Parsing of user inputs: names file, templates, labels CSV, faces folder / image manifest, image decoding.

Every bad input must raise InputError whose one-line message names the file (and line) and the bad value.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from idia_engine.engine.candidates.names_file import read_names
from idia_engine.engine.candidates.templates import PAPER_TEMPLATES, load_templates, normalize_template, render
from idia_engine.engine.errors import IdiaError, InputError
from idia_engine.engine.query.images import (
    ImageDataset,
    collate_images,
    collect_from_csv,
    collect_from_folder,
    hash_images,
)
from idia_engine.engine.query.labels import read_label_table, read_labels
from idia_engine.engine.query.report import write_persons
from idia_engine.engine.query.votes import paper_mode_votes
from PIL import Image


def raises_input_error(fn, *args, must_name: list[str]) -> str:
    """Call fn, expect InputError with a one-line message containing every string of `must_name`."""
    with pytest.raises(InputError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, f"message spans several lines: {message!r}"
    for part in must_name:
        assert part in message, f"{part!r} not in message {message!r}"
    assert isinstance(info.value, IdiaError)
    assert info.value.exit_code == 2  # a usage error the user can fix
    return message


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------------------------------
# Names file
# ----------------------------------------------------------------------------------------------------

def test_read_names_strips_and_skips_blanks_and_comments(tmp_path):
    f = write(tmp_path / "names.txt", "  Anna Smith  \n\n   \n# a comment\n  # an indented comment\n\tBob Jones\t\r\nCarl\n")
    got = read_names(f)
    assert got.names == ["Anna Smith", "Bob Jones", "Carl"]
    assert got.duplicates_dropped == 0


def test_read_names_keeps_unicode_as_written(tmp_path):
    names = ["José Martínez", "Zoë Kravitz", "Samuel L. Jackson", "Martin Luther King Jr.", "Björk Guðmundsdóttir",
             "李小龙", "Renée O'Connor-Smith"]
    got = read_names(write(tmp_path / "names.txt", "\n".join(names) + "\n"))
    assert got.names == names


def test_read_names_nfc_normalises_and_counts_duplicates(tmp_path):
    decomposed = "Zoe\u0308 Kravitz"
    composed = "Zo\u00eb Kravitz"
    assert decomposed != composed
    text = f"{decomposed}\nAnna\n{composed}\nAnna\n  Anna  \nBob\n"
    got = read_names(write(tmp_path / "names.txt", text))
    assert got.names == [composed, "Anna", "Bob"]  # first occurrence kept, in NFC
    assert got.names[0] == composed and len(got.names[0]) == len(composed)
    assert got.duplicates_dropped == 3
    assert got.duplicate_examples[0] == composed


def test_read_names_tolerates_a_bom(tmp_path):
    f = tmp_path / "names.txt"
    f.write_bytes(b"\xef\xbb\xbfAnna Smith\nBob\n")
    assert read_names(f).names == ["Anna Smith", "Bob"]


def test_read_names_drops_a_bom_opening_any_line(tmp_path):
    """Two files concatenated: the second one's byte-order mark starts a line in the middle."""
    f = tmp_path / "names.txt"
    f.write_bytes("\ufeffAnna Smith\nBob\n".encode("utf-8") * 2)
    got = read_names(f)
    assert got.names == ["Anna Smith", "Bob"] and got.duplicates_dropped == 2


# Each pair: two strings that open_clip's SimpleTokenizer (lower-casing, like the tiny model's) reads alike.
SAME_TOKENS = [
    ("Anna Smith", "Anna  Smith"),  # a run of spaces
    ("Anna Smith", "Anna \t Smith"),  # a tab among them (only folders and CSV cells could hold one)
    ("Anna Smith", "\ufeffAnna Smith"),  # a byte-order mark (ftfy removes it)
    ("Anna Smith", "Anna\u00a0Smith"),  # a no-break space
    ("Tom & Jerry", "Tom &amp; Jerry"),  # an HTML entity
    ("Tom & Jerry", "Tom &amp;amp; Jerry"),  # unescaped twice
    ("Anna Smith", "ANNA SMITH"),  # letter case
    ("Anna Smith", "Ａｎｎａ Ｓｍｉｔｈ"),  # full-width letters
    ("José Silva", "JosÃ© Silva"),  # mojibake
    ("Jean-Paul Costa", "Jean - Paul Costa"),  # punctuation is a word of its own
]


@pytest.mark.parametrize("first, later", SAME_TOKENS)
def test_names_with_the_same_tokens_are_twins(first, later, tiny_model):
    from idia_engine.engine.candidates.identity import NameTokens, TokenTwin

    tokens = NameTokens(tiny_model.tokenizer)
    names = ["Bob Jones", first, "Anna Smithe", later, "Tom Jerry"]
    assert tokens.twins(names) == [TokenTwin(later, first)]
    assert tokens.find([later, "Nobody Else"], names) == {later: 1}


def test_name_tokens_skeleton_never_separates_names_with_the_same_tokens(tiny_model):
    """The cheap skeleton must be equal whenever the token ids are, and for plain ASCII equal that of the
    cleaned text (the shortcut that skips ftfy)."""
    import random

    from idia_engine.engine.candidates.identity import NameTokens, _is_plain, _letters_and_digits

    tok = tiny_model.tokenizer
    tokens = NameTokens(tok)
    rng = random.Random(0)
    alphabet = "aAzZ -'._,&;#1\u00a0éÉÃ©ﬁＡ\u200b\ufeffİß"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(3000)]
    skeleton_of: dict = {}
    for text, key, skeleton in zip(texts, tokens.keys(texts), tokens.skeletons(texts)):
        assert skeleton_of.setdefault(key, skeleton) == skeleton, text
        if _is_plain(text):
            assert skeleton == _letters_and_digits(tok.clean_fn(text)), text


def test_name_tokens_of_a_tokenizer_without_encode_use_its_rows():
    from idia_engine.engine.candidates.identity import NameTokens, TokenTwin

    def case_sensitive(texts):  # no encode(): keyed by its rows
        return np.array([[ord(c) for c in " ".join(t.split()).ljust(12)[:12]] for t in texts])
    tokens = NameTokens(case_sensitive)
    assert tokens.twins(["Anna Smith", "ANNA SMITH", "Anna  Smith"]) == [TokenTwin("Anna  Smith", "Anna Smith")]


def test_read_names_missing_file(tmp_path):
    f = tmp_path / "nope.txt"
    raises_input_error(read_names, f, must_name=[str(f)])


def test_read_names_directory(tmp_path):
    d = tmp_path / "a_dir"
    d.mkdir()
    raises_input_error(read_names, d, must_name=[str(d)])


@pytest.mark.parametrize("text", ["", "\n\n  \n", "# only\n  # comments\n\n"])
def test_read_names_no_name(tmp_path, text):
    f = write(tmp_path / "names.txt", text)
    raises_input_error(read_names, f, must_name=[str(f)])


def test_read_names_not_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "names.txt"
    f.write_bytes("Anna\nBob\nJos\u00e9\n".encode("latin-1"))  # é as the single byte 0xe9
    msg = raises_input_error(read_names, f, must_name=[f"{f}:3"])
    assert "utf-8" in msg.lower()


@pytest.mark.parametrize(
    "bad, shown",
    [
        ("Anna\tSmith", "U+0009"),  # a tab inside the name
        ("Anna\x00Smith", "U+0000"),  # NUL
        ("Anna\x1bSmith", "U+001B"),  # escape
        ("Anna\rSmith", "U+000D"),  # a lone carriage return inside the line
        ("Anna\x7fSmith", "U+007F"),  # DEL
    ],
)
def test_read_names_control_characters(tmp_path, bad, shown):
    f = write(tmp_path / "names.txt", f"Bob\n# c\n{bad}\nCarl\n")
    raises_input_error(read_names, f, must_name=[f"{f}:3", shown, repr(bad)])


def test_read_names_200k_lines_is_fast(tmp_path):
    n = 200_000
    f = write(tmp_path / "names.txt", "".join(f"Person {i} Name\n" for i in range(n)) + "Person 7 Name\n")
    start = time.perf_counter()
    got = read_names(f)
    elapsed = time.perf_counter() - start
    assert len(got.names) == n and got.names[-1] == f"Person {n - 1} Name"
    assert got.duplicates_dropped == 1
    assert elapsed < 5.0, f"reading {n} names took {elapsed:.1f} s"


# ----------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------

# Written out from docs/attack.md, step 1, in order.
SPEC_TEMPLATES = [
    "{0}", "an image of {0}", "a photo of {0}", "{0} on a photo", "a photo of a person named {0}",
    "a person named {0}", "a man named {0}", "a woman named {0}", "the name of the person is {0}",
    "a photo of a person with the name {0}", "{0} at a gala", "a photo of the celebrity {0}", "actor {0}",
    "actress {0}", "a colored photo of {0}", "a black and white photo of {0}", "a cool photo of {0}",
    "a cropped photo of {0}", "a cropped image of {0}", "{0} in a suit", "{0} in a dress",
]


def test_paper_templates_are_the_21_of_the_spec_in_order():
    assert len(SPEC_TEMPLATES) == 21
    assert list(PAPER_TEMPLATES) == SPEC_TEMPLATES
    for t in PAPER_TEMPLATES:
        assert normalize_template(t) == t


@pytest.mark.parametrize(
    "given, expected",
    [("{}", "{0}"), ("{0}", "{0}"), ("a photo of {}", "a photo of {0}"), ("{} in a suit", "{0} in a suit"),
     ("  {0} é ", "  {0} é ")],
)
def test_normalize_template_accepts_one_placeholder(given, expected):
    assert normalize_template(given) == expected


@pytest.mark.parametrize(
    "bad",
    ["a photo of a person", "", "{0} and {0}", "{} and {0}", "{1}", "a photo of {name}", "{ 0 }",
     "a {0} }", "a { {0}", "{{0}}", "{0} }{"],
)
def test_normalize_template_rejects(bad):
    raises_input_error(lambda: normalize_template(bad, where="tpl.txt:7"), must_name=["tpl.txt:7", repr(bad)])


def test_load_templates_ignores_blanks_and_comments(tmp_path):
    f = write(tmp_path / "t.txt", "# my templates {with braces}\n\na photo of {}\n   \n  {0} at a gala  \n#x\n{0}\n")
    assert load_templates(f) == ("a photo of {0}", "{0} at a gala", "{0}")


def test_load_templates_bad_template_names_file_and_line(tmp_path):
    f = write(tmp_path / "t.txt", "# c\n{0}\n\na photo of {name}\n")
    raises_input_error(load_templates, f, must_name=[f"{f}:4", "{name}"])


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing\n#   here\n"])
def test_load_templates_empty(tmp_path, text):
    f = write(tmp_path / "t.txt", text)
    raises_input_error(load_templates, f, must_name=[str(f)])


def test_load_templates_duplicate_after_normalisation(tmp_path):
    f = write(tmp_path / "t.txt", "a photo of {}\nactor {0}\na photo of {0}\n")
    raises_input_error(load_templates, f, must_name=[str(f), "a photo of {0}"])


def test_load_templates_missing_file_and_directory(tmp_path):
    raises_input_error(load_templates, tmp_path / "nope.txt", must_name=[str(tmp_path / "nope.txt")])
    raises_input_error(load_templates, tmp_path, must_name=[str(tmp_path)])


def test_load_templates_tolerates_a_bom(tmp_path):
    # A UTF-8 file saved with a byte-order mark (as the names and labels readers tolerate) must not leave
    # U+FEFF at the start of the first prompt.
    f = tmp_path / "t.txt"
    f.write_bytes(b"\xef\xbb\xbfa photo of {0}\n{0}\n")
    assert load_templates(f) == ("a photo of {0}", "{0}")


@pytest.mark.parametrize(
    "template, name, expected",
    [
        ("{0} at a gala", "A {0} B", "A {0} B at a gala"),
        ("a photo of {0}", "x {} {1} {name} }{", "a photo of x {} {1} {name} }{"),
        ("{0}", "Zoë Kravitz Jr.", "Zoë Kravitz Jr."),
        ("actor {0}", "50% \\n $1", "actor 50% \\n $1"),
    ],
)
def test_render_does_not_interpret_braces_in_names(template, name, expected):
    assert render(template, name) == expected


def test_render_with_a_normalised_bare_placeholder():
    assert render(normalize_template("a photo of {}"), "Anna {0}") == "a photo of Anna {0}"


# ----------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------

def test_read_labels_values_any_case_and_nfc(tmp_path):
    rows = ["A,1", "B,0", "C,true", "D,FALSE", "E,Yes", "F,nO", "G, TRUE ", "Zoe\u0308 K,yes", "  H  ,no", "A,1"]
    f = write(tmp_path / "labels.csv", "name,member\n" + "\n".join(rows) + "\n")
    got = read_labels(f)
    assert got == {"A": True, "B": False, "C": True, "D": False, "E": True, "F": False, "G": True,
                   "Zo\u00eb K": True, "H": False}


def test_read_labels_header_with_spaces_and_bom(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_bytes(b"\xef\xbb\xbf name , member \r\nAnna,1\r\n")
    assert read_labels(f) == {"Anna": True}


def test_read_labels_missing_column(tmp_path):
    f = write(tmp_path / "labels.csv", "name,label\nAnna,1\n")
    raises_input_error(read_labels, f, must_name=[str(f), "member"])


@pytest.mark.parametrize("value", ["maybe", "2", "y", "", "tru"])
def test_read_labels_bad_value_names_file_line_and_value(tmp_path, value):
    f = write(tmp_path / "labels.csv", f"name,member\nAnna,1\nBob,{value}\nCarl,0\n")
    raises_input_error(read_labels, f, must_name=[f"{f}:3", repr(value), "Bob"])


def test_read_labels_line_number_counts_blank_lines(tmp_path):
    # The bad row is on physical line 4 of the file; a blank line precedes it.
    f = write(tmp_path / "labels.csv", "name,member\nAnna,1\n\nBob,maybe\n")
    raises_input_error(read_labels, f, must_name=[f"{f}:4", "'maybe'"])


def test_read_labels_contradicting_duplicate(tmp_path):
    f = write(tmp_path / "labels.csv", "name,member\nAnna,1\nBob,0\nAnna,no\n")
    raises_input_error(read_labels, f, must_name=[f"{f}:4", "'Anna'"])


def test_read_labels_contradiction_after_nfc(tmp_path):
    f = write(tmp_path / "labels.csv", "name,member\nZo\u00eb,1\nZoe\u0308,0\n")
    raises_input_error(read_labels, f, must_name=[f"{f}:3"])


def test_read_labels_no_rows(tmp_path):
    f = write(tmp_path / "labels.csv", "name,member\n")
    raises_input_error(read_labels, f, must_name=[str(f)])


def test_read_labels_missing_file(tmp_path):
    f = tmp_path / "nope.csv"
    raises_input_error(read_labels, f, must_name=[str(f)])


def test_read_labels_control_character_in_name(tmp_path):
    f = write(tmp_path / "labels.csv", "name,member\nAnna,1\nBo\x07b,0\n")
    raises_input_error(read_labels, f, must_name=[f"{f}:3"])


def test_read_labels_membership_column_of_the_paper_authors(tmp_path):
    rows = ["A,member", "B,non_member", "C,MEMBER", "D,Non_Member", "E,non-member", "F, NON-MEMBER "]
    f = write(tmp_path / "membership.csv", "name,membership\n" + "\n".join(rows) + "\n")
    table = read_label_table(f)
    assert table.members == {"A": True, "B": False, "C": True, "D": False, "E": False, "F": False}
    assert table.source_column == "membership"


@pytest.mark.parametrize("value", ["1", "yes", "nonmember", "non member", ""])
def test_read_labels_bad_membership_value(tmp_path, value):
    f = write(tmp_path / "membership.csv", f"name,membership\nAnna,member\nBob,{value}\n")
    raises_input_error(read_labels, f, must_name=[f"{f}:3", repr(value), "'Bob'", "member", "non_member"])


def _persons_csv(path: Path, labels: dict[str, bool] | None) -> Path:
    """A persons.csv as `query` writes it: Anna hits (member), Bob misses, Carl has no photo."""
    votes = paper_mode_votes(np.array([[0, 0], [0, 2], [0, 0]]), np.array([0, 0, 1]), np.array([0, 1, 2]))
    write_persons(path, ["Anna", "Bob", "Carl"], votes, votes.decisions(1), labels, np.ones(3, bool))
    return path


def test_read_labels_from_the_decisions_of_a_persons_csv(tmp_path):
    f = _persons_csv(tmp_path / "persons.csv", None)
    assert "decision" in f.read_text().splitlines()[0] and "Carl,0,0,non-member" in f.read_text()
    table = read_label_table(f)
    # Carl, without photos, was never decided: not labelled non-member for want of a score.
    assert table.members == {"Anna": True, "Bob": False} and table.source_column == "decision"
    assert not table.has_occurrences_column


def test_read_labels_from_a_persons_csv_prefers_its_labels(tmp_path):
    # The labels the report was run with, not the attack's decisions; names they did not give stay unlabelled.
    f = _persons_csv(tmp_path / "persons.csv", {"Anna": False, "Carl": True})
    table = read_label_table(f)
    assert table.members == {"Anna": False, "Carl": True} and table.source_column == "label"


def test_read_labels_persons_csv_with_an_empty_label_column_uses_decisions(tmp_path):
    f = _persons_csv(tmp_path / "persons.csv", {"Somebody Else": True})  # a label column, every cell empty
    assert "label" in f.read_text().splitlines()[0].split(",")
    assert read_label_table(f).source_column == "decision" and read_labels(f) == {"Anna": True, "Bob": False}


@pytest.mark.parametrize("text,column", [
    ("name,member,decision\nAnna,0,member\nBob,1,garbage\n", "member"),
    ("name,decision,member\nAnna,member,0\nBob,garbage,1\n", "member"),
    ("name,member,membership\nAnna,0,member\nBob,1,garbage\n", "member"),
    ("name,membership,decision,label\nAnna,non_member,member,member\nBob,member,garbage,garbage\n", "membership"),
    ("name,decision,label\nAnna,member,non-member\nBob,garbage,member\n", "label"),
    ("name,decision,label\nAnna,non-member,\nBob,member,\n", "decision"),
])
def test_read_labels_exactly_one_column_by_precedence(tmp_path, text, column):
    # Anna is a non-member and Bob a member by the winning column; the losing columns are not even parsed.
    table = read_label_table(write(tmp_path / "labels.csv", text))
    assert table.source_column == column and table.members == {"Anna": False, "Bob": True}


@pytest.mark.parametrize("text,column,value", [
    ("name,n_images,decision\nAnna,4,member\nBob,4,maybe\n", "decision", "maybe"),
    ("name,n_images,decision\nAnna,4,member\nBob,4,1\n", "decision", "1"),
    ("name,n_images,decision,label\nAnna,4,member,member\nBob,4,member,yes\n", "label", "yes"),
])
def test_read_labels_bad_persons_csv_value(tmp_path, text, column, value):
    f = write(tmp_path / "persons.csv", text)
    raises_input_error(read_labels, f, must_name=[f"{f}:3", column, repr(value), "'Bob'", "non-member"])


def test_read_labels_persons_csv_that_labels_nobody(tmp_path):
    f = write(tmp_path / "persons.csv", "name,n_images,score,decision\nAnna,0,0,non-member\n")
    raises_input_error(read_labels, f, must_name=[str(f), "n_images 0"])


def test_read_labels_without_any_membership_column_names_the_accepted_ones(tmp_path):
    f = write(tmp_path / "labels.csv", "name,is_member\nAnna,1\n")
    message = raises_input_error(read_labels, f, must_name=[str(f), "'member'", "'membership'", "'decision'"])
    assert "found name,is_member" in message
    # `label` alone is not enough: only persons.csv's label, beside its decision, is read.
    f = write(tmp_path / "labels.csv", "name,label\nAnna,member\n")
    raises_input_error(read_labels, f, must_name=[str(f), "'membership'"])


# ----------------------------------------------------------------------------------------------------
# Faces folder and image manifest
# ----------------------------------------------------------------------------------------------------

def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_collect_from_folder(tmp_path):
    faces = tmp_path / "faces"
    touch(faces / "Zed" / "1.jpg")
    a1 = touch(faces / "Anna_Smith" / "b.jpg")
    a0 = touch(faces / "Anna_Smith" / "a.png")
    a2 = touch(faces / "Anna_Smith" / "sub" / "deeper" / "c.jpg")
    touch(faces / "bob_de_la_Cruz" / "x.webp")
    (faces / "Empty_Person").mkdir()
    top = touch(faces / "readme.txt")
    got = collect_from_folder(faces)
    assert list(got.persons) == sorted(got.persons)
    assert set(got.persons) == {"Anna Smith", "Zed", "bob de la Cruz", "Empty Person"}
    assert sorted(got.persons["Anna Smith"]) == sorted([a0, a1, a2])
    assert got.persons["Empty Person"] == []
    assert [s.path for s in got.skipped] == [str(top)]
    assert got.skipped[0].reason  # a reason is given


def test_collect_from_folder_nfc_person_name(tmp_path):
    faces = tmp_path / "faces"
    touch(faces / "Zoe\u0308_Kravitz" / "1.jpg")
    assert list(collect_from_folder(faces).persons) == ["Zo\u00eb Kravitz"]


def test_collect_from_folder_two_folders_same_name(tmp_path):
    faces = tmp_path / "faces"
    touch(faces / "Anna_Smith" / "1.jpg")
    touch(faces / "Anna Smith" / "2.jpg")
    raises_input_error(collect_from_folder, faces, must_name=["Anna_Smith", "Anna Smith'", str(faces)])


def test_collect_from_folder_two_folders_same_name_after_nfc(tmp_path):
    faces = tmp_path / "faces"
    touch(faces / "Zo\u00eb" / "1.jpg")
    touch(faces / "Zoe\u0308" / "2.jpg")
    raises_input_error(collect_from_folder, faces, must_name=["Zo\u00eb", "Zoe\u0308"])


def test_collect_from_folder_missing(tmp_path):
    raises_input_error(collect_from_folder, tmp_path / "nope", must_name=[str(tmp_path / "nope")])


def test_collect_from_folder_is_a_file(tmp_path):
    f = touch(tmp_path / "faces.zip")
    raises_input_error(collect_from_folder, f, must_name=[str(f)])


def test_collect_from_folder_empty(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    raises_input_error(collect_from_folder, faces, must_name=[str(faces)])
    touch(faces / "loose.jpg")  # only files at the top level: still no person folder
    raises_input_error(collect_from_folder, faces, must_name=[str(faces)])


def test_collect_from_csv_relative_and_absolute_paths(tmp_path):
    elsewhere = touch(tmp_path / "elsewhere" / "b.jpg")
    folder = tmp_path / "manifest"
    touch(folder / "img" / "a.jpg")
    f = write(folder / "images.csv",
              f"path,name\nimg/a.jpg,Anna Smith\n{elsewhere},  Anna Smith \nimg/c.jpg,Zoe\u0308\n")
    got = collect_from_csv(f)
    assert list(got.persons) == ["Anna Smith", "Zo\u00eb"]
    assert got.persons["Anna Smith"] == [folder / "img" / "a.jpg", elsewhere]
    assert got.persons["Zo\u00eb"] == [folder / "img" / "c.jpg"]  # listed even if it does not exist yet


def test_collect_from_csv_missing_column(tmp_path):
    f = write(tmp_path / "images.csv", "file,name\na.jpg,Anna\n")
    raises_input_error(collect_from_csv, f, must_name=[str(f), "path,name"])


def test_collect_from_csv_empty_path_names_line(tmp_path):
    f = write(tmp_path / "images.csv", "path,name\na.jpg,Anna\n ,Bob\n")
    raises_input_error(collect_from_csv, f, must_name=[f"{f}:3"])


def test_collect_from_csv_line_number_counts_blank_lines(tmp_path):
    # The bad row is on physical line 4 of the file; a blank line precedes it.
    f = write(tmp_path / "images.csv", "path,name\na.jpg,Anna\n\nb.jpg,Bo\x07b\n")
    raises_input_error(collect_from_csv, f, must_name=[f"{f}:4"])


def test_collect_from_csv_no_rows_and_missing_file(tmp_path):
    f = write(tmp_path / "images.csv", "path,name\n")
    raises_input_error(collect_from_csv, f, must_name=[str(f)])
    raises_input_error(collect_from_csv, tmp_path / "nope.csv", must_name=[str(tmp_path / "nope.csv")])


# ----------------------------------------------------------------------------------------------------
# Hashing and decoding images
# ----------------------------------------------------------------------------------------------------

def test_hash_images(tmp_path):
    good = touch(tmp_path / "a.jpg", b"some bytes")
    empty = touch(tmp_path / "empty.jpg", b"")
    missing = tmp_path / "missing.jpg"
    hashes, skipped = hash_images([good, empty, missing])
    assert hashes == [hashlib.sha256(b"some bytes").hexdigest(), None, None]
    assert [s.path for s in skipped] == [str(empty), str(missing)]
    assert "empty" in skipped[0].reason
    assert skipped[1].reason


def _rng_rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """name -> (path, decodable?) for a zoo of image files."""
    d = tmp_path_factory.mktemp("images")
    files: dict[str, tuple[Path, bool]] = {}

    Image.fromarray(_rng_rgb(40, 50, 0)).save(d / "plain.jpg", quality=90)
    files["plain_jpeg"] = (d / "plain.jpg", True)

    Image.fromarray(_rng_rgb(64, 64, 1)).save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    files["truncated_png"] = (d / "truncated.png", False)

    (d / "text.jpg").write_text("this is not an image\n", encoding="utf-8")
    files["text_named_jpg"] = (d / "text.jpg", False)

    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95)
    files["cmyk_jpeg"] = (d / "cmyk.jpg", True)

    Image.fromarray(np.full((24, 36), 65535, np.uint16)).save(d / "grey16.png")
    files["png_16bit"] = (d / "grey16.png", True)

    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    pal.paste(1, (5, 5, 15, 15))
    pal.save(d / "palette.png", transparency=0)
    files["palette_transparent_png"] = (d / "palette.png", True)

    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = np.linspace(0, 255, 20, dtype=np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    files["rgba_png"] = (d / "rgba.png", True)

    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    files["animated_gif"] = (d / "anim.gif", True)

    (d / "empty.png").write_bytes(b"")
    files["empty_png"] = (d / "empty.png", False)
    return files


def test_fixture_images_have_the_intended_modes(image_files):
    # Guard: the zoo really holds the formats it claims (Pillow could silently save something else).
    with Image.open(image_files["cmyk_jpeg"][0]) as im:
        assert im.mode == "CMYK"
    with Image.open(image_files["png_16bit"][0]) as im:
        assert im.mode in ("I;16", "I;16B", "I;16L", "I")
    with Image.open(image_files["palette_transparent_png"][0]) as im:
        assert im.mode == "P" and "transparency" in im.info
    with Image.open(image_files["rgba_png"][0]) as im:
        assert im.mode == "RGBA"
    with Image.open(image_files["animated_gif"][0]) as im:
        assert getattr(im, "n_frames", 1) == 3


def test_image_dataset_and_collate(image_files, tiny_model):
    preprocess = tiny_model.preprocess
    expected_shape = tuple(preprocess(Image.new("RGB", (50, 40))).shape)
    assert expected_shape[0] == 3
    keys = sorted(image_files)
    items = [(image_files[k][0], f"sha-{k}") for k in keys]
    ds = ImageDataset(items, preprocess)
    assert len(ds) == len(keys)

    batch = [ds[i] for i in range(len(ds))]
    for k, (pixels, sha, path, error, retry) in zip(keys, batch):
        assert sha == f"sha-{k}" and path == str(image_files[k][0])
        assert not retry, k  # every failure here is the bytes' own: the store may remember it
        if image_files[k][1]:
            assert error is None, f"{k}: {error}"
            assert isinstance(pixels, torch.Tensor) and tuple(pixels.shape) == expected_shape, k
            assert pixels.dtype == torch.float32
            assert torch.isfinite(pixels).all()
        else:
            assert pixels is None, k
            assert error and "\n" not in error, f"{k}: {error!r}"

    stacked, shas, failed = collate_images(batch)
    good = [k for k in keys if image_files[k][1]]
    bad = [k for k in keys if not image_files[k][1]]
    assert shas == [f"sha-{k}" for k in good]
    assert tuple(stacked.shape) == (len(good), *expected_shape)
    assert set(failed) == {f"sha-{k}" for k in bad}
    assert all(failed.values())
    assert any(re.search("decod", r) for r in failed.values())


def _unnormalise(pixels: torch.Tensor, preprocess) -> torch.Tensor:
    norm = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)
    return pixels * std + mean


@pytest.mark.parametrize(
    "key, rgb",
    [
        ("png_16bit", (1.0, 1.0, 1.0)),  # 16-bit white stays white (scaled to 8 bit, not clipped)
        ("cmyk_jpeg", (1.0, 0.0, 0.0)),  # CMYK (0, 255, 255, 0) is red
        ("animated_gif", (1.0, 0.0, 0.0)),  # first frame is red
    ],
)
def test_decoded_colours(image_files, tiny_model, key, rgb):
    pixels, _, _, error, _ = ImageDataset([(image_files[key][0], "s")], tiny_model.preprocess)[0]
    assert error is None
    centre = _unnormalise(pixels, tiny_model.preprocess)[:, pixels.shape[1] // 2, pixels.shape[2] // 2]
    assert centre.tolist() == pytest.approx(list(rgb), abs=0.08)


def test_16bit_mid_grey_is_scaled_not_clipped(tmp_path, tiny_model):
    path = tmp_path / "mid16.png"
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(path)
    pixels, _, _, error, _ = ImageDataset([(path, "s")], tiny_model.preprocess)[0]
    assert error is None
    centre = _unnormalise(pixels, tiny_model.preprocess)[:, 16, 16]
    assert centre.tolist() == pytest.approx([128 / 255] * 3, abs=0.02)


def test_collate_all_failed(tmp_path):
    bad = touch(tmp_path / "x.jpg", b"nope")
    ds = ImageDataset([(bad, "h1")], lambda im: torch.zeros(3, 4, 4))
    stacked, shas, failed = collate_images([ds[0]])
    assert stacked is None and shas == [] and list(failed) == ["h1"]


def test_collect_from_folder_two_folders_differ_only_in_case(tmp_path):
    faces = tmp_path / "faces"
    touch(faces / "Anna_Smith" / "1.jpg")
    touch(faces / "anna smith" / "2.jpg")
    raises_input_error(collect_from_folder, faces, must_name=[str(faces / "Anna_Smith"), str(faces / "anna smith"),
                                                              "letter case"])


def test_collect_from_csv_names_differ_only_in_case(tmp_path):
    f = write(tmp_path / "images.csv", "path,name\na.jpg,Anna Smith\nb.jpg,Anna Smith\nc.jpg,ANNA SMITH\n")
    raises_input_error(collect_from_csv, f, must_name=[f"{f}:4", "'ANNA SMITH'", "'Anna Smith'", "line 2"])


def test_unreadable_text_inputs_are_input_errors(tmp_path, monkeypatch):
    # chmod 000 does not stop root: make the read itself fail, as it does for a user without permission.
    import idia_engine.engine.candidates.names_file as names_mod

    f = write(tmp_path / "names.txt", "Anna\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(names_mod, "open", denied, raising=False)
    raises_input_error(read_names, f, must_name=[str(f), "Permission denied"])
    monkeypatch.setattr(Path, "read_bytes", denied)
    t = write(tmp_path / "t.txt", "{0}\n")
    raises_input_error(load_templates, t, must_name=[str(t), "Permission denied"])
    lab = write(tmp_path / "labels.csv", "name,member\nA,1\n")
    raises_input_error(read_labels, lab, must_name=[str(lab), "Permission denied"])


# ----------------------------------------------------------------------------------------------------
# Hostile photos through the real CLI: EXIF orientation, the same evidence twice
# ----------------------------------------------------------------------------------------------------

# The pixels stored for each EXIF orientation so that a viewer (exif_transpose) shows the upright photo:
# the inverse of the transpose the tag asks for (2, 3, 4, 5, 7 are their own inverses).
_STORED_FOR_ORIENTATION = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                           6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
                           8: Image.Transpose.ROTATE_270}


def _cli(*args):
    from idia_engine.cli.app import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory, world, tiny_model_files):
    """The world's 40 names built into an index with the tiny model, through the CLI."""
    idx = tmp_path_factory.mktemp("hostile-index") / "idx"
    config, ckpt = tiny_model_files
    r = _cli("build-index", world["names_file"], "--index-dir", idx, "--model", config, "--pretrained", ckpt, "-q")
    assert r.exit_code == 0, r.output
    return idx


def _query(faces_or_manifest: Path, idx: Path, out: Path, *extra) -> tuple[dict, list[dict], str]:
    """Run query; (summary.json, images.csv rows, stderr)."""
    source = ["--manifest", faces_or_manifest] if faces_or_manifest.suffix == ".csv" else [faces_or_manifest]
    r = _cli("query", *source, "--index-dir", idx, "--out", out, "--store", out.parent / "store", "-q", *extra)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    with open(out / "predictions" / "images.csv", newline="", encoding="utf-8") as f:
        return summary, list(csv.DictReader(f)), r.stderr


def test_every_exif_orientation_gives_the_upright_photos_scores(tmp_path, world, cli_index, tiny_model):
    person = world["people"][0]
    source = sorted((world["faces"] / person.replace(" ", "_")).glob("*.png"))[0]
    upright = Image.open(source).convert("RGB").crop((0, 0, 48, 30))  # not square: a rotation changes the shape
    folder = tmp_path / "faces" / person.replace(" ", "_")
    folder.mkdir(parents=True)
    upright.save(folder / "upright.png")  # no EXIF at all
    for orientation, stored_as in _STORED_FOR_ORIENTATION.items():
        exif = Image.Exif()
        exif[0x0112] = orientation  # the Orientation tag, as a phone writes it
        (upright if stored_as is None else upright.transpose(stored_as)).save(folder / f"o{orientation}.png",
                                                                              exif=exif)
    # The test means something: the sideways pixels as stored give another embedding than the upright ones.
    sideways = Image.open(folder / "o6.png").convert("RGB")
    assert sideways.size == (30, 48)
    raw = tiny_model.encode_images(torch.stack([tiny_model.preprocess(im) for im in (upright, sideways)]))
    assert not np.allclose(raw[0], raw[1], atol=1e-3)

    summary, images, _ = _query(tmp_path / "faces", cli_index, tmp_path / "report")
    assert summary["skipped_files"] == [] and summary["counts"]["images_used"] == 9
    assert summary["duplicate_photos"] == []  # other bytes (pixels laid out otherwise, EXIF): not copies
    ids = np.load(tmp_path / "report" / "predictions" / "topk_ids.npy")
    scores = np.load(tmp_path / "report" / "predictions" / "topk_scores.npy")
    first = next(i for i, row in enumerate(images) if row["path"].endswith("upright.png"))
    for i, row in enumerate(images):
        assert (ids[i] == ids[first]).all(), row["path"]
        np.testing.assert_allclose(scores[i], scores[first], atol=1e-5, err_msg=row["path"])


def _photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rng_rgb(40, 40, seed)).save(path)
    return path


def test_the_same_photo_twice_in_a_folder_votes_once(tmp_path, world, cli_index):
    ann, bob = world["people"][:2]
    a, b = tmp_path / "faces" / ann.replace(" ", "_"), tmp_path / "faces" / bob.replace(" ", "_")
    _photo(a / "a.png", 1)
    _photo(a / "b.png", 2)
    shutil.copy(a / "a.png", a / "c-copy-of-a.png")
    (a / "sub").mkdir()
    shutil.copy(a / "b.png", a / "sub" / "a-copy-of-b.png")
    (a / "d-link-to-a.png").symlink_to("a.png")
    _photo(b / "x.png", 3)
    shutil.copy(a / "a.png", b / "y-same-as-anns-a.png")  # another person: not a duplicate, both vote

    summary, images, stderr = _query(tmp_path / "faces", cli_index, tmp_path / "report")
    kept_a, kept_b = str(a / "a.png"), str(a / "b.png")
    # Listing order is os.walk's: the folder's files by name, then sub-folders: the copy in sub/ is dropped.
    assert summary["duplicate_photos"] == [
        {"person": ann, "kept": kept_a, "dropped": str(a / "c-copy-of-a.png"), "sha256": _sha(a / "a.png")},
        {"person": ann, "kept": kept_a, "dropped": str(a / "d-link-to-a.png"), "sha256": _sha(a / "a.png")},
        {"person": ann, "kept": kept_b, "dropped": str(a / "sub" / "a-copy-of-b.png"), "sha256": _sha(a / "b.png")},
    ]
    assert summary["counts"]["duplicate_photos_dropped"] == 3
    assert summary["counts"]["images_found"] == 7 and summary["counts"]["images_used"] == 4
    assert summary["photos_shared_between_persons"] == [
        {"sha256": _sha(a / "a.png"), "persons": [ann, bob], "paths": [kept_a, str(b / "y-same-as-anns-a.png")]}]
    assert [(r["name"], r["path"]) for r in images] == [(ann, kept_a), (ann, kept_b), (bob, str(b / "x.png")),
                                                        (bob, str(b / "y-same-as-anns-a.png"))]
    assert re.search(r"warning: dropped 3 duplicate photo\(s\).*c-copy-of-a\.png", stderr)
    assert re.search(r"warning: 1 photo\(s\) appear under more than one person", stderr)
    with open(tmp_path / "report" / "persons.csv", newline="", encoding="utf-8") as f:
        assert {r["name"]: int(r["n_images"]) for r in csv.DictReader(f)} == {ann: 2, bob: 2}
    # evaluate reads the deduplicated rows as any report's
    # evaluate reads the deduplicated rows as any report's (two members and two non-members: its bootstrap
    # over persons needs two of each)
    for other in world["people"][2:4]:
        shutil.copytree(world["faces"] / other.replace(" ", "_"), tmp_path / "faces" / other.replace(" ", "_"))
    _query(tmp_path / "faces", cli_index, tmp_path / "report")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"name,member\n{ann},1\n{bob},0\n{world['people'][2]},1\n{world['people'][3]},0\n",
                      encoding="utf-8")
    r = _cli("evaluate", tmp_path / "report", "--labels", labels, "--n", "1,2", "--draws", "2")
    assert r.exit_code == 0, r.output


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_manifest_listing_one_file_twice_votes_once_also_in_a_subset(tmp_path, world, cli_index):
    ann = world["people"][0]
    img = tmp_path / "img"
    for i in range(4):
        _photo(img / f"p{i}.png", 10 + i)
    (img / "link.png").symlink_to("p0.png")
    rows = ["img/p0.png", "./img/p0.png", "img/link.png", str(img / "p0.png"), "img/../img/p0.png",
            "img/p1.png", "img/p2.png", "img/p3.png", "img/p1.png"]
    manifest = tmp_path / "images.csv"
    manifest.write_text("path,name\n" + "".join(f"{p},{ann}\n" for p in rows), encoding="utf-8")

    summary, images, _ = _query(manifest, cli_index, tmp_path / "all")
    assert [r["path"] for r in images] == [str(tmp_path / p) for p in ("img/p0.png", "img/p1.png", "img/p2.png",
                                                                       "img/p3.png")]  # first line kept
    # "./img/p0.png" and the absolute path read as the first line's path; the symlink and ".." do not.
    assert [d["dropped"] for d in summary["duplicate_photos"]] == [
        str(img / "p0.png"), str(img / "link.png"), str(img / "p0.png"), str(tmp_path / "img/../img/p0.png"),
        str(img / "p1.png")]
    assert {d["kept"] for d in summary["duplicate_photos"]} == {str(img / "p0.png"), str(img / "p1.png")}
    assert summary["counts"]["duplicate_photos_dropped"] == 5

    # A subset draws distinct photos: 3 of the 4, however many copies the draw met.
    for seed in range(4):
        summary, images, _ = _query(manifest, cli_index, tmp_path / f"subset-{seed}", "--images-per-person", "3",
                                    "--seed", seed)
        assert len(images) == 3 and len({r["sha256"] for r in images}) == 3
        kept = {r["sha256"]: r["path"] for r in images}
        assert all(kept[d["sha256"]] == d["kept"] for d in summary["duplicate_photos"])


def test_choose_photos_without_copies_draws_as_before(tmp_path):
    from idia_engine.engine.candidates.names_file import name_hash64
    from idia_engine.engine.query.images import choose_photos

    paths = [_photo(tmp_path / f"{i:02d}.png", i) for i in range(12)]
    for seed in range(5):
        rng = np.random.default_rng([seed, name_hash64("Anna Smith")])
        before = [paths[i] for i in sorted(rng.choice(len(paths), size=5, replace=False))]
        chosen = choose_photos("Anna Smith", paths, 5, seed)
        assert chosen.paths == before and chosen.duplicates == []
        assert chosen.shas == [_sha(p) for p in before]
    assert choose_photos("Anna Smith", paths, None, 0).paths == paths


# ----------------------------------------------------------------------------------------------------
# Hostile inputs: typed artifact JSON, output placement, option domains, cost bounds
# ----------------------------------------------------------------------------------------------------


def test_artifact_schema_names_the_file_and_the_key(tmp_path):
    from idia_engine.engine.disk.textfiles import REPORT_SUMMARY_SCHEMA, check_fields
    from idia_engine.engine.errors import ArtifactError

    good = {"schema_version": 1, "artifact": "idia-engine attack report", "parameters": {"tau": 1, "labels_file": None},
            "index": {"templates": ["{0}"]}, "model": {}, "persons_without_images": []}
    check_fields(good, REPORT_SUMMARY_SCHEMA, tmp_path / "summary.json", "run query again")
    cases = [({"parameters": {"tau": "1", "labels_file": None}}, r"key 'parameters\.tau' must be a whole number or null"),
             ({"parameters": []}, r"key 'parameters' must be an object or null, not a list"),
             ({"index": []}, r"key 'index' must be an object or null, not a list"),
             ({"index": {"templates": ["{0}", 3]}}, r"key 'index\.templates\[1\]' must be a string"),
             ({"persons_without_images": "Anna"}, r"key 'persons_without_images' must be a list")]
    for change, pattern in cases:
        with pytest.raises(ArtifactError, match=pattern) as info:
            check_fields({**good, **change}, REPORT_SUMMARY_SCHEMA, tmp_path / "summary.json", "run query again")
        assert str(tmp_path / "summary.json") in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ArtifactError, match=r"lacks the key 'artifact'"):
        check_fields({k: v for k, v in good.items() if k != "artifact"}, REPORT_SUMMARY_SCHEMA, tmp_path / "s.json", "")


def test_index_manifest_schema_covers_every_field():
    from idia_engine.engine.index.layout import INDEX_MANIFEST_SCHEMA, MODEL_INFO_SCHEMA, IndexManifest
    from idia_engine.engine.model.load import ModelInfo

    assert set(INDEX_MANIFEST_SCHEMA.required) | set(INDEX_MANIFEST_SCHEMA.optional or {}) == \
        set(IndexManifest.__dataclass_fields__)  # optional: keys added later, absent from older indexes
    assert set(MODEL_INFO_SCHEMA.required) == set(ModelInfo.__dataclass_fields__)


def test_store_json_of_wrong_types_is_one_line(tmp_path):
    import json

    from idia_engine.engine.errors import ArtifactError
    from idia_engine.engine.query.store import EmbeddingStore

    with EmbeddingStore(tmp_path / "store"):
        pass
    manifest = tmp_path / "store" / "store.json"
    obj = json.loads(manifest.read_text(encoding="utf-8"))
    manifest.write_text(json.dumps({**obj, "library_versions": ["numpy"]}), encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"store\.json: key 'library_versions' must be an object"):
        EmbeddingStore(tmp_path / "store")


@pytest.mark.parametrize("out, inputs, pattern", [
    ("faces/report", [("faces folder", "faces")], r"--out .*faces/report is inside the faces folder"),
    ("idx", [("index dir", "idx")], r"is the index dir"),
    ("rep", [("embedding store", "rep/store")], r"the embedding store .*rep/store is inside --out"),
    (".", [], r"has no name of its own"),
])
def test_output_placement_is_refused(tmp_path, out, inputs, pattern):
    from idia_engine.engine.disk.atomic import check_output_placement

    with pytest.raises(InputError, match=pattern):
        check_output_placement(tmp_path / out if out != "." else Path("."), "--out",
                               [(what, tmp_path / p) for what, p in inputs])


def test_staged_directory_refuses_a_symlink_and_keeps_its_target(tmp_path):
    from idia_engine.engine.disk.atomic import staged_directory

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(InputError, match=r"is a symbolic link"), \
            staged_directory(tmp_path / "link", replace_existing=True) as tmp:
        (tmp / "x").write_text("new")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "mine"]


@pytest.mark.parametrize("make, pattern", [
    (lambda: __import__("idia_engine.engine.query.run", fromlist=["QueryConfig"]).QueryConfig(
        Path("idx"), Path("faces"), top_k=3000), r"--top-k must be <= 2048"),
    (lambda: __import__("idia_engine.engine.query.run", fromlist=["QueryConfig"]).QueryConfig(
        Path("idx"), Path("faces"), search_params={"nprobe": float("nan")}), r"--search-param nprobe must be"),
    (lambda: __import__("idia_engine.engine.query.run", fromlist=["QueryConfig"]).QueryConfig(
        Path("idx"), Path("faces"), top_k="10"), r"--top-k must be a whole number"),
    (lambda: __import__("idia_engine.engine.evaluate.protocol", fromlist=["EvalConfig"]).EvalConfig(tau="1"),
     r"--tau must be a whole number"),
    (lambda: __import__("idia_engine.engine.evaluate.protocol", fromlist=["EvalConfig"]).EvalConfig(draws=10**9),
     r"--draws must be <= 100000"),
    (lambda: __import__("idia_engine.engine.evaluate.protocol", fromlist=["EvalConfig"]).EvalConfig(
        confidence=float("nan")), r"confidence must be in \[0\.5, 1\)"),
    (lambda: __import__("idia_engine.engine.compare.run", fromlist=["CompareConfig"]).CompareConfig(
        Path("c"), tau=1.5), r"--tau must be a whole number"),
    (lambda: __import__("idia_engine.engine.index.build", fromlist=["BuildConfig"]).BuildConfig(
        Path("n.txt"), index_kind="PQ16x0"), r"parameter of 0"),
])
def test_config_dataclasses_refuse_values_outside_their_domain(make, pattern):
    with pytest.raises(InputError, match=pattern) as info:
        make()
    assert "\n" not in str(info.value)


def test_photo_shape_is_checked_from_the_header_before_decoding(tmp_path):
    import io

    from idia_engine.engine.query.images import MAX_ASPECT_RATIO, PhotoShapeError, decode_rgb

    strip = io.BytesIO()
    Image.new("L", (400_000, 1)).save(strip, format="PNG")
    assert len(strip.getvalue()) < 2000  # tiny file, huge preprocessing: the attack
    t0 = time.perf_counter()
    with pytest.raises(PhotoShapeError, match=r"400000 x 1 pixels is not the shape of a photo"):
        decode_rgb(strip.getvalue())
    assert time.perf_counter() - t0 < 1.0
    ok = io.BytesIO()
    Image.new("RGB", (MAX_ASPECT_RATIO * 4, 4)).save(ok, format="PNG")
    assert decode_rgb(ok.getvalue()).size == (MAX_ASPECT_RATIO * 4, 4)


def test_one_huge_line_of_names_is_refused_without_reading_it_whole(tmp_path):
    from idia_engine.engine.candidates.names_file import MAX_LINE_BYTES

    f = tmp_path / "names.txt"
    f.write_bytes(b"Anna Smith\n" + b"A" * (10 << 20) + b"\nBob Jones\n")
    t0 = time.perf_counter()
    raises_input_error(read_names, f, must_name=[f"{f}:2", f"{MAX_LINE_BYTES} bytes"])
    assert time.perf_counter() - t0 < 1.0
